"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, widths 16/32/64, option A shortcuts.

resnet20 0.27M, resnet32 0.46M, resnet44 0.66M, resnet56 0.86M, resnet110 1.7M parameters
(10 classes). Stages: conv1/bn1 stem, layer1..layer3, adaptive average pool, fc.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .stages import stage_widths


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the new channels (option A)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        if extra_channels < 0:
            raise ValueError(f"an option-A shortcut only adds channels, got {extra_channels} extra; "
                             f"a stage cannot be narrower than the one before it")
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (
            ShortcutA(planes - in_planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place ops throughout: a tap on bn2 must not see the residual added into it.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; any in_channels, any input of at least 8x8."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] | None = None):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110), got {depth}.")
        n = (depth - 2) // 6
        w1, w2, w3 = stage_widths(f"resnet{depth}", widths, (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = self._stage(w1, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        self.stem_points: tuple[str, ...] = ("conv1", "bn1")
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3")
        self.head_points: tuple[str, ...] = ("pool", "fc")
        self.stage_channels: tuple[int, ...] = (w1, w2, w3)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.layer3(self.layer2(self.layer1(self.forward_stem(x)))))


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-20 (0.27M parameters at 10 classes)."""
    return CifarResNet(20, num_classes, in_channels, widths)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-32 (0.46M)."""
    return CifarResNet(32, num_classes, in_channels, widths)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-44 (0.66M)."""
    return CifarResNet(44, num_classes, in_channels, widths)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-56 (0.86M)."""
    return CifarResNet(56, num_classes, in_channels, widths)


@register_model("resnet110")
def resnet110(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None) -> CifarResNet:
    """ResNet-110 (1.7M)."""
    return CifarResNet(110, num_classes, in_channels, widths)
