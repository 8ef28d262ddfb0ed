"""Small models for digits (8x8) and Fashion-MNIST (28x28): a compact CNN and an MLP.

small_cnn: three stages of two conv-BN-ReLU (widths 32/64/128 x width), 2x2 max-pool between
stages, adaptive average pool, fc; 0.29M parameters at width=1.
mlp: flatten, hidden Linear-ReLU layers (default one of 256), fc. Its first layer's size depends
on the image size, so it takes `image_size` (default 8, digits) and builds every layer at
construction. (nn.LazyLinear was the alternative; it leaves parameters uninitialised until a
first forward, which breaks parameter counting, optimiser construction and DDP before it.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import register_model
from .stages import stage_widths


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU, same resolution."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages; cheap enough to train on a CPU, strong on digits/Fashion-MNIST."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0,
                 widths: Sequence[int] | None = None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"small_cnn width must be positive, got {width}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"small_cnn dropout must be in [0, 1), got {dropout}.")
        c1, c2, c3 = stage_widths("small_cnn", widths, [max(1, round(c * width)) for c in (32, 64, 128)])
        # ceil_mode pools take 8x8 -> 4 -> 2 and 28x28 -> 14 -> 7 without dropping edge pixels.
        self.layer1 = nn.Sequential(conv_bn_relu(in_channels, c1), conv_bn_relu(c1, c1))
        self.layer2 = nn.Sequential(
            nn.MaxPool2d(2, 2, ceil_mode=True), conv_bn_relu(c1, c2), conv_bn_relu(c2, c2)
        )
        self.layer3 = nn.Sequential(
            nn.MaxPool2d(2, 2, ceil_mode=True), conv_bn_relu(c2, c3), conv_bn_relu(c3, c3)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c3, num_classes)
        self.stem_points: tuple[str, ...] = ()
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3")
        self.head_points: tuple[str, ...] = ("pool", "dropout", "fc")
        self.stage_channels: tuple[int, ...] = (c1, c2, c3)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.layer3(self.layer2(self.layer1(self.forward_stem(x)))))


class MLP(nn.Module):
    """Flatten, hidden Linear-ReLU layers, linear classifier; for images of exactly `image_size`."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden_sizes: Sequence[int] = (256,),
        image_size: int | Sequence[int] = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"mlp image_size must be a positive int or an (H, W) pair, got {image_size!r}.")
        sizes = list(hidden_sizes)
        if any(not isinstance(h, int) or h < 1 for h in sizes):
            raise ValueError(f"mlp hidden_sizes must be positive integers, got {hidden_sizes!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp dropout must be in [0, 1), got {dropout}.")
        self.input_shape: tuple[int, int, int] = (in_channels, size[0], size[1])
        width = in_channels * size[0] * size[1]
        layers = []
        for h in sizes:
            block = [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            width = h
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.tap_points: tuple[str, ...] = tuple(f"hidden.{i}" for i in range(len(sizes)))
        self.stage_channels: tuple[int, ...] = tuple(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"mlp was built for inputs of shape {self.input_shape} (C, H, W) but got "
                f"{tuple(x.shape[1:])}; create it with in_channels and image_size matching the data."
            )
        return self.fc(self.hidden(torch.flatten(x, 1)))


@register_model("small_cnn")
def small_cnn(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0,
    widths: Sequence[int] | None = None,
) -> SmallCNN:
    """Compact CNN, widths 32/64/128 x width (0.29M at width=1); `widths` sets each stage's."""
    return SmallCNN(num_classes, in_channels, width, dropout, widths)


@register_model("mlp")
def mlp(
    num_classes: int = 10,
    in_channels: int = 3,
    hidden_sizes: Sequence[int] = (256,),
    image_size: int | Sequence[int] = 8,
    dropout: float = 0.0,
) -> MLP:
    """MLP over flattened pixels of images of size `image_size` (int or (H, W); default 8)."""
    return MLP(num_classes, in_channels, hidden_sizes, image_size, dropout)
