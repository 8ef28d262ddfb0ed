"""gaussian: x + N(0, 1)·step/255, per pixel."""

from __future__ import annotations

import torch

from .base import Draw, register_perturbation


@register_perturbation("gaussian")
def gaussian(x01: torch.Tensor, draw: Draw) -> torch.Tensor:
    return torch.randn(x01.shape, generator=draw.noise, device=x01.device) * (draw.step / 255)
