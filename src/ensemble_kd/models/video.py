"""DBoF for frame-level video features (YouTube-8M), the video model of EnsembleNet (section 4.2).

Input: frame features (B, T, D), zero-padded to a common T. A frame is valid iff any of its
features is non-zero (mask = x.abs().amax(-1) > 0), so padding needs no side channel; a real
frame that is exactly zero is treated as padding (it carries no information either way).
An item with no valid frame pools to a zero vector.

    frames:     per valid frame BatchNorm (the input's) + Linear D->cluster (no bias) + BatchNorm +
                ReLU6 + context gating, then pooling over the valid frames: SWAP (default), max or
                average                                                   -> (B, cluster)
    hidden:     Linear cluster->hidden (no bias) + BatchNorm + ReLU6      -> (B, hidden)
    classifier: per-class mixture of logistic experts -> probabilities, then context gating on
                them (p * sigmoid(BN(W p)), yt8m's gating of the probabilities) -> p  (B, C)
    output:     logits log p - log(1 - p), p clamped to [1e-6, 1 - 1e-6], so sigmoid(model(x)) = p.

`gating` places the context gates: "paper" (the above, EnsembleNet section 4.2: gates between the
frame clustering and the pooling and after the MoE, BN on the input and after every fully
connected layer); "hidden" (one gate after the hidden layer, no input BN: this package's earlier
DBoF); "none" ("hidden" without the gate).

The clustering BatchNorm sees the valid frames only (they are gathered into one (n_valid,
cluster) matrix), so its statistics do not depend on how much padding a batch has, and in
eval mode padding an input with extra zero frames leaves the output unchanged.
The model keeps the stage contract of models/stages.py: stages "frames" and "hidden".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import register_model
from .stages import stage_widths

POOLINGS = ("swap", "max", "avg")
GATINGS = ("paper", "hidden", "none")
PROB_EPS = 1e-6  # the MoE's probabilities are clamped here before the logit: |logit| <= 13.8


def swap(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """Self-weighted average pooling: sum_t |x_t| x_t / sum_t |x_t| per feature, over frames along `dim`.

    `mask` (x's shape without the last, feature, dimension; True = valid) drops frames.
    Large-magnitude frames dominate a feature's average while zero frames add nothing; the
    denominator is clamped at `eps`, so a feature that is zero on every frame pools to 0.
    """
    weight = x.abs()
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x without its feature dimension), "
                             f"got {tuple(mask.shape)}.")
        weight = weight * mask.unsqueeze(-1).to(x.dtype)
    return (weight * x).sum(dim) / weight.sum(dim).clamp_min(eps)


def frame_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True for frames with any non-zero feature (the zero-padding convention)."""
    return x.abs().amax(-1) > 0


class ContextGating(nn.Module):
    """y = x * sigmoid(W x + b) (Miech et al. 2017): features re-weight each other, optionally with BN on W x."""

    def __init__(self, dim: int, batch_norm: bool = False):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=not batch_norm)  # BN's shift replaces the bias
        self.bn = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.bn(self.linear(x)))


class MoEClassifier(nn.Module):
    """YouTube-8M's mixture of logistic experts, per class; forward returns probabilities (B, C).

    Each class c has num_experts logistic experts and a softmax gate over num_experts + 1
    choices; the extra choice is a dummy expert that always says 0, so the gate can push p_c
    towards 0 without saturating an expert. p_c = sum_{e < E} gate_{c,e} * sigmoid(expert_{c,e}).
    Output units are class-major: gate unit c * (E + 1) + e, expert unit c * E + e (the dummy is
    e = E). The gate has no bias, as in yt8m's MoeModel.
    """

    def __init__(self, in_features: int, num_classes: int, num_experts: int = 2):
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
        self.num_classes, self.num_experts = num_classes, num_experts
        self.gate = nn.Linear(in_features, num_classes * (num_experts + 1), bias=False)
        self.experts = nn.Linear(in_features, num_classes * num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gate(x).view(-1, self.num_classes, self.num_experts + 1).softmax(-1)
        experts = torch.sigmoid(self.experts(x).view(-1, self.num_classes, self.num_experts))
        return (gates[..., : self.num_experts] * experts).sum(-1)


class FrameClustering(nn.Module):
    """(B, T, D) -> (B, cluster): per valid frame [input BatchNorm] + Linear + BatchNorm + ReLU6
    [+ context gating], pooled over the valid frames."""

    def __init__(self, feature_dim: int, cluster_size: int, pooling: str = "swap", input_bn: bool = True,
                 gating: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}.")
        self.feature_dim, self.pooling = feature_dim, pooling
        self.input_bn = nn.BatchNorm1d(feature_dim) if input_bn else nn.Identity()
        self.linear = nn.Linear(feature_dim, cluster_size, bias=False)
        self.bn = nn.BatchNorm1d(cluster_size)
        self.gating = ContextGating(cluster_size, batch_norm=True) if gating else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.feature_dim:
            raise ValueError(f"dbof expects frame features of shape (B, T, {self.feature_dim}), "
                             f"got {tuple(x.shape)}.")
        mask = frame_mask(x)
        # Gathering the valid frames keeps padding out of every BatchNorm's statistics.
        valid = self.gating(nn.functional.relu6(self.bn(self.linear(self.input_bn(x[mask])))))
        h = valid.new_zeros(*mask.shape, valid.shape[-1]).index_put((mask,), valid)
        if self.pooling == "swap":
            return swap(h, mask)
        if self.pooling == "avg":
            return h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
        # ReLU6 (times a sigmoid gate) is >= 0, so the zeros at padded frames never win a max over valid ones.
        return h.amax(1)


class DBoF(nn.Module):
    """Deep bag of frames: frame clustering + pooling, a hidden layer, MoE classifier, context gates; logits.

    `widths`, when given, is a (cluster_size, hidden_size) pair that overrides both sizes.
    """

    def __init__(self, num_classes: int, feature_dim: int, cluster_size: int = 256, hidden_size: int = 128,
                 num_experts: int = 2, pooling: str = "swap", gating: str = "paper",
                 widths: Sequence[int] | None = None):
        super().__init__()
        cluster_size, hidden_size = stage_widths("dbof", widths, [cluster_size, hidden_size])
        if min(cluster_size, hidden_size) < 1:
            raise ValueError(f"dbof cluster_size and hidden_size must be positive, got {cluster_size}, {hidden_size}.")
        if gating not in GATINGS:
            raise ValueError(f"dbof gating must be one of {', '.join(GATINGS)}, got {gating!r}.")
        paper = gating == "paper"
        self.gating = gating
        self.frames = FrameClustering(feature_dim, cluster_size, pooling, input_bn=paper, gating=paper)
        self.hidden = nn.Sequential(
            nn.Linear(cluster_size, hidden_size, bias=False), nn.BatchNorm1d(hidden_size), nn.ReLU6(),
            ContextGating(hidden_size, batch_norm=True) if gating == "hidden" else nn.Identity(),
        )
        self.classifier = nn.Sequential(MoEClassifier(hidden_size, num_classes, num_experts),
                                        ContextGating(num_classes, batch_norm=True) if paper else nn.Identity())
        self.stem_points: tuple[str, ...] = ()
        self.tap_points: tuple[str, ...] = ("frames", "hidden")
        self.head_points: tuple[str, ...] = ("classifier",)
        self.stage_channels: tuple[int, ...] = (cluster_size, hidden_size)
        self.multilabel = True  # outputs are independent per-class logits: train with BCE, not softmax CE

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.logit(self.classifier(h), eps=PROB_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.hidden(self.frames(self.forward_stem(x))))


@register_model("dbof")
def dbof(
    num_classes: int = 10,
    in_channels: int = 1024,
    cluster_size: int = 256,
    hidden_size: int = 128,
    num_experts: int = 2,
    pooling: str = "swap",
    gating: str = "paper",
    widths: Sequence[int] | None = None,
) -> DBoF:
    """DBoF over frames of `in_channels` features (YouTube-8M RGB: 1024); `widths` = (cluster, hidden)."""
    return DBoF(num_classes, in_channels, cluster_size, hidden_size, num_experts, pooling, gating, widths)
