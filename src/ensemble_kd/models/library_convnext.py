"""timm's ConvNeXt through the stage contract (models/stages.py).

    net = create("timm/convnext_tiny")
    expose_stages(net)      # stem, stages stages.0..stages.3, head (pool, norm, fc)
    branch = at_widths(net, "timm/convnext_tiny", 1000, 3, {}, widths, at=3)  # stages.3 and head narrower

ConvNeXt takes its stage widths as the `dims` argument, so a member with narrower upper stages is
timm's own constructor with other dims: stage i's downsampling takes dims[i - 1] channels, so the
shared lower stages feed the narrower branch unchanged.
"""

from __future__ import annotations

import sys

from torch import nn

from .registry import create


def _is_convnext(model: nn.Module) -> bool:
    lib = sys.modules.get("timm.models.convnext")  # loaded when timm built the model; never imported here
    return lib is not None and isinstance(model, lib.ConvNeXt)


def expose_stages(model: nn.Module) -> bool:
    """Give a timm ConvNeXt the stage contract's names in place; False (untouched) for anything else."""
    if not _is_convnext(model):
        return False
    if not isinstance(model.norm_pre, nn.Identity):
        raise ValueError("a ConvNeXt with head_norm_first normalises between its stages and its head; the "
                         "multi-head builder takes the ConvNeXts that normalise in the head (the default)")
    model.stem_points = ("stem",)
    model.tap_points = tuple(f"stages.{i}" for i in range(len(model.stages)))
    model.head_points = ("head",)  # timm's forward_head: pool, norm, fc
    model.stage_channels = tuple(int(info["num_chs"]) for info in model.feature_info)
    return True


def at_widths(base_model: nn.Module, base: str, num_classes: int, in_channels: int, kwargs: dict, widths,
              at: int) -> nn.Module | None:
    """A new `create(base, ...)` like `base_model` with stages `at`.. at `widths[at:]` (the lower
    ones at the base's), or None when `base_model` is no timm ConvNeXt."""
    if not _is_convnext(base_model):
        return None
    dims = tuple(base_model.stage_channels[:at]) + tuple(int(w) for w in widths[at:])
    model = create(base, num_classes=num_classes, in_channels=in_channels, **{**kwargs, "dims": dims})
    expose_stages(model)
    return model
