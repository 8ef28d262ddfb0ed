"""Wide ResNets (Zagoruyko & Komodakis 2016): WRN-depth-width, pre-activation basic blocks.

WRN-16-2 0.69M, WRN-40-2 2.2M, WRN-28-10 36.5M parameters (10 classes).
Stages: conv1 stem, layer1..layer3 (widths 16k/32k/64k), bn + ReLU, adaptive average pool, fc.

wrn_latentbe is the WRN of the LatentBE code (cs-giung/distill-latentbe, giung2-jax's PreResNet,
WRN-28-4 on CIFAR-100): the same layers and parameters, but its 1x1 projection shortcut takes
the block's raw input, not the pre-activated one.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .init import he_init
from .registry import register_model
from .stages import stage_widths


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float, preact_shortcut: bool = True):
        super().__init__()
        self.preact_shortcut = preact_shortcut
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal = in_planes == planes and stride == 1
        self.shortcut = (
            nn.Identity() if self.equal else nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # As in the reference code: the projection shortcut sees the pre-activated input (LatentBE's: the raw one).
        return out + (x if self.equal else self.shortcut(act if self.preact_shortcut else x))


class WideResNet(nn.Module):
    """WRN-depth-width for small images; any in_channels, any input of at least 8x8."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        widths: Sequence[int] | None = None,
        preact_shortcut: bool = True,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (16, 28, 40), got {depth}.")
        if width < 1:
            raise ValueError(f"WRN width must be a positive integer, got {width}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WRN dropout must be in [0, 1), got {dropout}.")
        n = (depth - 4) // 6
        widths = tuple(stage_widths(f"wrn{depth}_{width}", widths, (16 * width, 32 * width, 64 * width)))
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.layer1 = self._stage(16, widths[0], n, 1, dropout, preact_shortcut)
        self.layer2 = self._stage(widths[0], widths[1], n, 2, dropout, preact_shortcut)
        self.layer3 = self._stage(widths[1], widths[2], n, 2, dropout, preact_shortcut)
        self.bn = nn.BatchNorm2d(widths[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        # Stage ends are the pre-activation block outputs (the final bn/ReLU belongs to the head).
        self.stem_points: tuple[str, ...] = ("conv1",)
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3")
        self.head_points: tuple[str, ...] = ("bn", "pool", "fc")
        self.stage_channels: tuple[int, ...] = widths
        he_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int, dropout: float,
               preact_shortcut: bool) -> nn.Sequential:
        layers = [WideBlock(in_planes, planes, stride, dropout, preact_shortcut)]
        layers += [WideBlock(planes, planes, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(x))), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.layer3(self.layer2(self.layer1(self.forward_stem(x)))))


@register_model("wrn")
def wrn(
    num_classes: int = 10, in_channels: int = 3, depth: int = 28, width: int = 10, dropout: float = 0.0,
    widths: Sequence[int] | None = None,
) -> WideResNet:
    """WRN-depth-width; the aliases below fix depth and width. `widths` sets each stage's channels."""
    return WideResNet(depth, width, num_classes, in_channels, dropout, widths)


def _alias(depth: int, width: int):
    def builder(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0,
                widths: Sequence[int] | None = None) -> WideResNet:
        return WideResNet(depth, width, num_classes, in_channels, dropout, widths)

    builder.__name__ = f"wrn{depth}_{width}"
    builder.__doc__ = f"WRN-{depth}-{width}."
    return register_model(builder.__name__)(builder)


# The teacher/student pairs used across the KD literature (RepDistiller, AE-KD) and WRN-28-10.
for _depth, _width in ((16, 1), (16, 2), (16, 4), (16, 8), (28, 2), (28, 10), (40, 1), (40, 2), (40, 4)):
    _alias(_depth, _width)


@register_model("wrn_latentbe")
def wrn_latentbe(
    num_classes: int = 10, in_channels: int = 3, depth: int = 28, width: int = 4, dropout: float = 0.0,
    widths: Sequence[int] | None = None,
) -> WideResNet:
    """LatentBE's WRN (default WRN-28-4, 5.87M at 100 classes): projection shortcuts on the raw block input."""
    return WideResNet(depth, width, num_classes, in_channels, dropout, widths, preact_shortcut=False)
