"""MobileNetV2 (Sandler et al. 2018), CIFAR variant: stride-1 stem and stride-1 second stage.

2.24M parameters at width_mult=1 and 10 classes (the ImageNet body; only the strides differ).
Stages split by resolution: layer1 (full), layer2 (/2), layer3 (/4), layer4 (/8); then the
1x1 conv head to 1280 channels, adaptive average pool, dropout, fc.

mobilenetv2_aekd is the other CIFAR variant, AE-KD's "MobileNetV2" (RepDistiller's mobile_half,
from the Route Constrained Optimization code): width 0.5 with channels truncated (int(c * w), not
rounded to multiples of 8), a stride-2 stem (so its stages run at /2 .. /16), ReLU instead of ReLU6,
and a 1x1 expansion conv also in the expansion-1 block; head to 1280 channels. 0.70M at 10 classes,
0.81M at 100.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .registry import register_model

# (expansion t, channels c, repeats n, stride s) per row, grouped into stages by resolution.
STAGES: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),  # s=1 here (ImageNet: 2) keeps 32x32 inputs detailed
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                  act: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU6 (or `act`)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        act(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, act: type[nn.Module] = nn.ReLU6,
                 always_expand: bool = False):
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [conv_bn_relu6(in_ch, hidden, 1, act=act)] if expand != 1 or always_expand else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden, act=act),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images; any in_channels, any input of at least 8x8."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.0,
        aekd: bool = False,
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"mobilenetv2 width_mult must be positive, got {width_mult}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mobilenetv2 dropout must be in [0, 1), got {dropout}.")
        # AE-KD's variant (see the module docstring): its rounding, stem stride and blocks.
        rounding = int if aekd else make_divisible
        block = functools.partial(InvertedResidual, act=nn.ReLU, always_expand=True) if aekd else InvertedResidual
        act = nn.ReLU if aekd else nn.ReLU6
        channels = rounding(32 * width_mult)
        self.stem = conv_bn_relu6(in_channels, channels, 3, 2 if aekd else 1, act=act)
        stage_channels = []
        for i, rows in enumerate(STAGES, start=1):
            blocks = []
            for t, c, n, s in rows:
                out_ch = rounding(c * width_mult)
                for j in range(n):
                    blocks.append(block(channels, out_ch, s if j == 0 else 1, t))
                    channels = out_ch
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            stage_channels.append(channels)
        last = rounding(1280 * max(1.0, width_mult))
        self.head = conv_bn_relu6(channels, last, 1, act=act)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(last, num_classes)
        self.tap_points: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
        self.stage_channels: tuple[int, ...] = tuple(stage_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(self.head(x)), 1)
        return self.fc(self.dropout(x))


@register_model("mobilenetv2")
def mobilenetv2(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.0
) -> MobileNetV2:
    """MobileNetV2, CIFAR strides (2.24M at width_mult=1)."""
    return MobileNetV2(num_classes, in_channels, width_mult, dropout)


@register_model("mobilenetv2_aekd")
def mobilenetv2_aekd(num_classes: int = 10, in_channels: int = 3, width_mult: float = 0.5) -> MobileNetV2:
    """AE-KD's CIFAR MobileNetV2 (RepDistiller's mobile_half: 0.70M at 10 classes, 0.81M at 100)."""
    return MobileNetV2(num_classes, in_channels, width_mult, aekd=True)
