"""MobileNet (v1, Howard et al. 2017) for CIFAR, as in the MEAL code (kuangliu's pytorch-cifar).

3x3 stride-1 stem to 32 channels, then 13 depthwise-separable blocks (3x3 depthwise conv-BN-ReLU,
1x1 conv-BN-ReLU; no conv has a bias) at widths 64, 128x2, 256x2, 512x6, 1024x2, the first of
each new width strided 2 (but 64); global average pool (the code's 2x2 pool on its 2x2 map), fc.
3.22M parameters at 10 classes. Stages split by resolution: layer1 (full), layer2 (/2) .. layer5 (/16).
"""

from __future__ import annotations

import torch
from torch import nn

from .init import he_init
from .registry import register_model

# Output channels of each block by stage; a stage's first block has stride 2 (the first stage's, 1).
STAGES: tuple[tuple[int, ...], ...] = ((64,), (128, 128), (256, 256), (512,) * 6, (1024, 1024))


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU())


def separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1, each with BN and ReLU."""
    return nn.Sequential(conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch), conv_bn_relu(in_ch, out_ch, 1))


class MobileNet(nn.Module):
    """MobileNet v1 for small images; any in_channels, any input of at least 1x1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 32, 3)
        channels = 32
        for i, widths in enumerate(STAGES, start=1):
            blocks = []
            for j, width in enumerate(widths):
                blocks.append(separable(channels, width, 2 if j == 0 and i > 1 else 1))
                channels = width
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.tap_points: tuple[str, ...] = tuple(f"layer{i}" for i in range(1, len(STAGES) + 1))
        self.stage_channels: tuple[int, ...] = tuple(widths[-1] for widths in STAGES)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.tap_points:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("meal_mobilenet")
def meal_mobilenet(num_classes: int = 10, in_channels: int = 3) -> MobileNet:
    """MEAL's CIFAR MobileNet (v1, 3.22M at 10 classes)."""
    return MobileNet(num_classes, in_channels)
