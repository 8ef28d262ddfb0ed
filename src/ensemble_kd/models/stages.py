"""The stage contract: a model as stem -> stages -> head, so that builders can cut it.

A model that keeps it has
- `stem_points`, `tap_points`, `head_points`: the paths of its submodules (direct ones, or
  entries of a container such as ConvNeXt's `stages.0`) that make the stem, each stage (in order),
  and the head;
- optionally `forward_stem(x)` and `forward_head(h)` (else the stem's and the head's modules run
  in order, flattened before a Linear), with forward(x) = head(stages(stem(x)));
- `stage_channels`: each stage's output channels, and a `widths` constructor argument that
  sets them (the multi-head builder shrinks the branches through it);
- optionally `width_unit` (default 1): output channels per unit of the model's width config, the
  widths a paper's table states (a bottleneck ResNet's planes: 4).
small_cnn, the CIFAR ResNets, the WRNs and dbof keep it; timm's and torchvision's ResNets are
given it by models/library_resnets.py (their widths rebuilt there, not by an argument), timm's
ConvNeXt by models/library_convnext.py (through its `dims` argument).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def stage_widths(name: str, widths: Sequence[int] | None, default: Sequence[int]) -> list[int]:
    """`widths` (one channel count per stage) when given, else the default; checked."""
    if widths is None:
        return list(default)
    widths = list(widths)
    if len(widths) != len(default) or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                              for w in widths):
        raise ValueError(f"{name} widths must be {len(default)} positive integers (one per stage), got {widths!r}.")
    return widths


def has_stages(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("stem_points", "tap_points", "head_points", "stage_channels"))


def run_stages(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    for name in names:  # a direct submodule, or a path into a container (ConvNeXt's stages.2)
        x = model.get_submodule(name)(x)
    return x


def forward_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    own = getattr(model, "forward_stem", None)
    return own(x) if own is not None else run_stages(model, x, model.stem_points)


def forward_head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    own = getattr(model, "forward_head", None)  # ours, and timm's (pool, dropout, fc)
    if own is not None:
        return own(h)
    for name in model.head_points:
        module = model.get_submodule(name)
        h = module(h.flatten(1) if isinstance(module, nn.Linear) and h.dim() > 2 else h)
    return h
