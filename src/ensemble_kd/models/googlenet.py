"""GoogLeNet (Szegedy et al. 2015) for CIFAR, as in the MEAL code (kuangliu's pytorch-cifar).

A 3x3 stride-1 stem (conv-BN-ReLU to 192), inception modules 3a-3b, a 3x3 stride-2 max-pool,
4a-4e, another, 5a-5b, global average pool, fc. Each inception concatenates four branches: 1x1;
1x1 then 3x3; 1x1 then two 3x3 (for the paper's 5x5); 3x3 max-pool then 1x1; every conv has a bias
and is followed by BN and ReLU, as in that code. 6.17M parameters at 10 classes.
Stages: layer1 = 3a-3b (full resolution), layer2 = pool + 4a-4e (/2), layer3 = pool + 5a-5b (/4).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import register_model

# name: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection), by stage.
STAGES: tuple[dict[str, tuple[int, int, int, int, int, int]], ...] = (
    {"a3": (64, 96, 128, 16, 32, 32), "b3": (128, 128, 192, 32, 96, 64)},
    {"a4": (192, 96, 208, 16, 48, 64), "b4": (160, 112, 224, 24, 64, 64), "c4": (128, 128, 256, 24, 64, 64),
     "d4": (112, 144, 288, 32, 64, 64), "e4": (256, 160, 320, 32, 128, 128)},
    {"a5": (256, 160, 320, 32, 128, 128), "b5": (384, 192, 384, 48, 128, 128)},
)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), nn.BatchNorm2d(out_ch), nn.ReLU()]


class Inception(nn.Module):
    def __init__(self, in_planes: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_planes: int):
        super().__init__()
        self.b1 = nn.Sequential(*conv_bn_relu(in_planes, n1x1, 1))
        self.b2 = nn.Sequential(*conv_bn_relu(in_planes, n3x3red, 1), *conv_bn_relu(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(*conv_bn_relu(in_planes, n5x5red, 1), *conv_bn_relu(n5x5red, n5x5, 3),
                                *conv_bn_relu(n5x5, n5x5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *conv_bn_relu(in_planes, pool_planes, 1))
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNet(nn.Module):
    """CIFAR GoogLeNet; any in_channels, any input of at least 1x1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, 192, 3))
        channels = 192
        stage_channels = []
        for i, modules in enumerate(STAGES, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if i > 1:
                layers["pool"] = nn.MaxPool2d(3, 2, 1)
            for name, planes in modules.items():
                layers[name] = Inception(channels, *planes)
                channels = layers[name].out_channels
            setattr(self, f"layer{i}", nn.Sequential(layers))
            stage_channels.append(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3")
        self.stage_channels: tuple[int, ...] = tuple(stage_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("googlenet")
def googlenet(num_classes: int = 10, in_channels: int = 3) -> GoogLeNet:
    """MEAL's CIFAR GoogLeNet (6.17M at 10 classes)."""
    return GoogLeNet(num_classes, in_channels)
