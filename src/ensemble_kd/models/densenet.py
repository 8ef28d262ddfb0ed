"""DenseNet-BC for CIFAR (Huang et al. 2017): bottleneck layers, compression 0.5, three dense blocks.

Depth L gives (L - 4) / 6 bottleneck layers (BN-ReLU-1x1 conv to 4k, BN-ReLU-3x3 conv to k) per
block; the stem is one 3x3 conv to 2k channels; transitions are BN-ReLU-1x1 conv to half the
channels (floored) and a 2x2 average pool; the head is BN-ReLU, global average pool, fc. No conv
has a bias. At 10 classes: L=100 k=12 0.77M ("0.8M" in Huang et al.), L=100 k=24 3.01M (MEAL's
"DenseNet-BC (k=24)", whose text gives L=100), L=250 k=24 15.32M ("15.3M").
Stages: layer1 = block 1; layer2, layer3 = transition + block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import he_init
from .registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k); its output is the input with the k new maps appended."""

    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


def transition(in_planes: int, out_planes: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(), nn.Conv2d(in_planes, out_planes, 1, bias=False),
                         nn.AvgPool2d(2, ceil_mode=True))  # ceil: odd sides (7x7 of 28x28 inputs) keep their edge


class DenseNetBC(nn.Module):
    """DenseNet-BC-depth-k; any in_channels, any input of at least 1x1."""

    def __init__(self, depth: int = 100, growth_rate: int = 24, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"densenet_bc depth must be 6n+4 with n >= 1 (100, 250), got {depth}.")
        if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
            raise ValueError(f"densenet_bc growth_rate must be a positive integer, got {growth_rate!r}.")
        n = (depth - 4) // 6
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False)
        stage_channels = []
        for i in range(1, 4):
            layers: list[nn.Module] = []
            if i > 1:
                layers.append(transition(planes, planes // 2))
                planes //= 2
            for _ in range(n):
                layers.append(DenseLayer(planes, growth_rate))
                planes += growth_rate
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            stage_channels.append(planes)
        self.bn = nn.BatchNorm2d(planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3")
        self.stage_channels: tuple[int, ...] = tuple(stage_channels)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(F.relu(self.bn(x))), 1))


@register_model("densenet_bc")
def densenet_bc(num_classes: int = 10, in_channels: int = 3, depth: int = 100, growth_rate: int = 24) -> DenseNetBC:
    """DenseNet-BC-depth-k; the default is MEAL's (L=100, k=24: 3.01M at 10 classes)."""
    return DenseNetBC(depth, growth_rate, num_classes, in_channels)
