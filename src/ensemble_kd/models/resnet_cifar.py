"""CIFAR ResNets: He et al. 2016 (section 4.2) and the ResNet-18 of kuangliu's pytorch-cifar.

resnet20 0.27M, resnet32 0.46M, resnet44 0.66M, resnet56 0.86M, resnet110 1.7M parameters
(10 classes): 6n+2 layers, widths 16/32/64, option A (parameter-free) shortcuts as in the paper;
`shortcut="B"` gives the 1x1-conv + BN projections of RepDistiller's and AE-KD's code
(resnet20 0.28M there). resnet18_cifar (11.2M): the MEAL code's ResNet-18, four stages of two
basic blocks at widths 64..512, 3x3 stride-1 stem, no max-pool, projection shortcuts.
Stages: conv1/bn1 stem, layer1..layerN, adaptive average pool, fc.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .stages import run_stages, stage_widths


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


SHORTCUTS = ("A", "B")


def projection(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Option B: a strided 1x1 conv and BN (RepDistiller's and kuangliu's ResNets)."""
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (option A or B where the shape changes), then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = ShortcutA(planes - in_planes) if shortcut == "A" else projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place ops throughout: a tap on bn2 must not see the residual added into it.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, stages of basic blocks (the first of each but the first strided), pool, fc;
    any in_channels, any input of at least 2^(stages-1) pixels a side."""

    def __init__(self, name: str, blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"{name} shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}.")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        planes = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths), start=1):
            setattr(self, f"layer{i}", self._stage(planes, width, n, 1 if i == 1 else 2, shortcut))
            planes = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        self.stem_points: tuple[str, ...] = ("conv1", "bn1")
        self.tap_points: tuple[str, ...] = tuple(f"layer{i}" for i in range(1, len(blocks) + 1))
        self.head_points: tuple[str, ...] = ("pool", "fc")
        self.stage_channels: tuple[int, ...] = tuple(widths)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride, shortcut)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(run_stages(self, self.forward_stem(x), self.tap_points))


class CifarResNet(ResNet):
    """ResNet-(6n+2) for small images; any in_channels, any input of at least 8x8."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] | None = None, shortcut: str = "A"):
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 56, 110), got {depth}.")
        name = f"resnet{depth}"
        super().__init__(name, [(depth - 2) // 6] * 3, stage_widths(name, widths, (16, 32, 64)),
                         num_classes, in_channels, shortcut)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None,
             shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (0.27M parameters at 10 classes); shortcut "B" for AE-KD's projections."""
    return CifarResNet(20, num_classes, in_channels, widths, shortcut)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None,
             shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (0.46M); shortcut "B" for AE-KD's projections."""
    return CifarResNet(32, num_classes, in_channels, widths, shortcut)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None,
             shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (0.66M); shortcut "B" for AE-KD's projections."""
    return CifarResNet(44, num_classes, in_channels, widths, shortcut)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None,
             shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (0.86M); shortcut "B" for AE-KD's projections."""
    return CifarResNet(56, num_classes, in_channels, widths, shortcut)


@register_model("resnet110")
def resnet110(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None,
             shortcut: str = "A") -> CifarResNet:
    """ResNet-110 (1.7M); shortcut "B" for AE-KD's projections."""
    return CifarResNet(110, num_classes, in_channels, widths, shortcut)


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] | None = None) -> ResNet:
    """ResNet-18 of the MEAL code (kuangliu's pytorch-cifar): 11.17M at 10 classes."""
    return ResNet("resnet18_cifar", [2, 2, 2, 2], stage_widths("resnet18_cifar", widths, (64, 128, 256, 512)),
                  num_classes, in_channels, shortcut="B")
