"""The zoo's common initialisation: He-normal convs (fan-out, for ReLU), zero conv and fc biases."""

from __future__ import annotations

from torch import nn


def he_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)
