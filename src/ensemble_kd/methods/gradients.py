"""Gradient scaling: identity forward, the gradient multiplied on its way back.

MEAL's minimax reverses the adversarial gradient that reaches the student (scale -1);
EnsembleNet's learned gate turns the ensemble term's factor into a multiplier on the
gradient that reaches the branches.
"""

from __future__ import annotations

import torch


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient passes back multiplied by `scale`."""
    return _ScaleGradient.apply(x, float(scale))
