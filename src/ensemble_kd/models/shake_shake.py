"""Shake-Shake (Gastaldi 2017) for CIFAR, as in the author's code (xgastaldi/shake-shake, cifar10 model).

A block adds its skip path to a random convex mix of two residual branches (ReLU-conv3x3-BN-ReLU-
conv3x3-BN each): alpha * b1 + (1 - alpha) * b2 forward and beta, 1 - beta on the gradients
backward, alpha and beta drawn per image ("Shake-Shake-Image", the 26 2x96d 2.86% CIFAR-10 setting
MEAL's baseline quotes); in eval both are 0.5. Where the width changes, the skip is ReLU, then two
1x1 convs to half the channels each, one on the (strided) input and one on the input shifted one
pixel right and down, concatenated, then BN. Stem: 3x3 conv to 16 channels + BN; head: ReLU, global
average pool, fc. Every conv has a bias, as the author's (cudnn's default). Depth 6n+2 (n blocks a
stage), base width k: stages of k, 2k, 4k channels. shake_shake26_2x96d: 26.2M at 10 classes.

alpha and beta are drawn from torch's generator in the forward pass, so a seeded run (and its
resume) replays them exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .init import he_init
from .registry import register_model
from .stages import run_stages, stage_widths


class _Shake(torch.autograd.Function):
    """alpha * a + (1 - alpha) * b forward; the gradient split by beta, 1 - beta backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return b + alpha * (a - b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (beta,) = ctx.saved_tensors
        return beta * grad, (1 - beta) * grad, None, None


def shake(a: torch.Tensor, b: torch.Tensor, training: bool) -> torch.Tensor:
    """The Shake-Shake-Image mix of two branch outputs; 0.5 each in eval."""
    if not training:
        return 0.5 * (a + b)
    shape = (a.shape[0],) + (1,) * (a.dim() - 1)
    alpha = torch.rand(shape, device=a.device, dtype=a.dtype)
    beta = torch.rand(shape, device=a.device, dtype=a.dtype)
    return _Shake.apply(a, b, alpha, beta)


def branch(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(in_planes, planes, 3, stride, 1), nn.BatchNorm2d(planes),
        nn.ReLU(), nn.Conv2d(planes, planes, 3, 1, 1), nn.BatchNorm2d(planes),
    )


class ShiftedSkip(nn.Module):
    """ReLU, then 1x1 convs on the input and on it shifted by one pixel, each to half the channels; BN."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes // 2, 1)
        self.conv2 = nn.Conv2d(in_planes, planes - planes // 2, 1)  # odd widths (narrowed branches) round here
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        shifted = F.pad(x, (1, -1, 1, -1))  # one pixel right and down, as the author's SpatialZeroPadding(1,-1,1,-1)
        s = self.stride
        return self.bn(torch.cat([self.conv1(x[:, :, ::s, ::s]), self.conv2(shifted[:, :, ::s, ::s])], 1))


class ShakeBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.branch1 = branch(in_planes, planes, stride)
        self.branch2 = branch(in_planes, planes, stride)
        self.skip = ShiftedSkip(in_planes, planes, stride) if in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + shake(self.branch1(x), self.branch2(x), self.training)


class ShakeShakeNet(nn.Module):
    """Shake-Shake-depth (6n+2) with stages `widths`; any in_channels, any input of at least 4x4."""

    def __init__(self, depth: int = 26, widths: Sequence[int] = (96, 192, 384), num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"shake-shake depth must be 6n+2 with n >= 1 (26), got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(16)
        planes = 16
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            blocks = [ShakeBlock(planes, width, stride)] + [ShakeBlock(width, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            planes = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        self.stem_points: tuple[str, ...] = ("conv1", "bn1")
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3")
        self.head_points: tuple[str, ...] = ("pool", "fc")
        self.stage_channels: tuple[int, ...] = tuple(widths)
        he_init(self)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(run_stages(self, self.forward_stem(x), self.tap_points))


@register_model("shake_shake26_2x96d")
def shake_shake26_2x96d(num_classes: int = 10, in_channels: int = 3,
                        widths: Sequence[int] | None = None) -> ShakeShakeNet:
    """Shake-Shake-26 2x96d (26.2M at 10 classes); `widths` sets the three stages' channels."""
    return ShakeShakeNet(26, stage_widths("shake_shake26_2x96d", widths, (96, 192, 384)), num_classes, in_channels)
