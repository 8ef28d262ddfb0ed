"""VGG with batch norm for small images (the common CIFAR variant: one linear classifier on 512).

vgg11_bn 9.2M, vgg13_bn 9.4M, vgg16_bn 14.7M, vgg19_bn 20.0M parameters (10 classes).
Layout: `features` (torchvision-style flat Sequential of conv-BN-ReLU and 5 max-pools),
adaptive average pool, `classifier`. Taps: the max-pool that ends each of the 5 stages (its output,
where the MEAL authors tap their VGGs). The convs have no bias (BN cancels one); the MEAL code's
(kuangliu's) VGGs have them, which is their only difference from these: vgg19_bn 5,504 parameters.

vgg13_bn_aekd is AE-KD's vgg13 (RepDistiller's, CIFAR layout): five blocks of conv(with bias)-BN-ReLU,
2x2 max-pools after the first three only (its fourth runs only on 64-pixel inputs), so blocks 4
and 5 both see 4x4 maps of a 32x32 input; global average pool, fc. 9.46M at 100 classes. Taps:
the five block outputs (layer1..layer5, each block after the pool before it).
"""

from __future__ import annotations

import torch
from torch import nn

from .init import he_init
from .registry import register_model

# Channels per conv; "M" is a 2x2 max-pool that closes a stage.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-BN; any in_channels, any input of at least 1x1 (pools are ceil-mode, see below)."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}.")
        layers: list[nn.Module] = []
        taps: list[str] = []
        channels = in_channels
        for item in CONFIGS[depth]:
            if item == "M":
                taps.append(f"features.{len(layers)}")  # the pool's output
                # ceil_mode keeps a 1x1 map at 1x1 and rounds odd sizes up, so five pools
                # work on 8x8 (digits) and 28x28 (Fashion-MNIST) inputs; on even sizes it is
                # the usual floor-mode pool.
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [
                    nn.Conv2d(channels, int(item), 3, 1, 1, bias=False),
                    nn.BatchNorm2d(int(item)),
                    nn.ReLU(),  # not in-place: a tap on the BN before it must keep its values
                ]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.tap_points: tuple[str, ...] = tuple(taps)
        self.stage_channels: tuple[int, ...] = tuple(
            int(c) for c, nxt in zip(CONFIGS[depth], CONFIGS[depth][1:]) if nxt == "M"
        )
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11 with batch norm (9.2M)."""
    return VGG(11, num_classes, in_channels)


@register_model("vgg13_bn")
def vgg13_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-13 with batch norm (9.4M)."""
    return VGG(13, num_classes, in_channels)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with batch norm (14.7M)."""
    return VGG(16, num_classes, in_channels)


@register_model("vgg19_bn")
def vgg19_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-19 with batch norm (20.0M)."""
    return VGG(19, num_classes, in_channels)


class VGGAEKD(nn.Module):
    """RepDistiller's VGG-BN for CIFAR; any in_channels, any input of at least 1x1."""

    def __init__(self, depth: int = 13, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        blocks: list[list[int]] = [[]]
        for item in CONFIGS[depth][:-1]:  # the last "M" is their global average pool
            if item == "M":
                blocks.append([])
            else:
                blocks[-1].append(int(item))
        channels = in_channels
        for i, widths in enumerate(blocks, start=1):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2, ceil_mode=True)] if 1 < i <= 4 else []
            for width in widths:
                layers += [nn.Conv2d(channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.tap_points: tuple[str, ...] = tuple(f"layer{i}" for i in range(1, len(blocks) + 1))
        self.stage_channels: tuple[int, ...] = tuple(widths[-1] for widths in blocks)
        he_init(self)  # as theirs, with an N(0, 0.01) classifier
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.tap_points:
            x = getattr(self, name)(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model("vgg13_bn_aekd")
def vgg13_bn_aekd(num_classes: int = 10, in_channels: int = 3) -> VGGAEKD:
    """AE-KD's vgg13 (RepDistiller's VGG-13-BN, 9.46M at 100 classes)."""
    return VGGAEKD(13, num_classes, in_channels)
