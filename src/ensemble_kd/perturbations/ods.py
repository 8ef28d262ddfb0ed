"""Output diversified sampling (ODS) and its confidence-scaled form (ConfODS).

ods: one teacher drawn per batch and one w_b ~ U(-1, 1)^K per sample (shaped like the logits, as
the reference code draws it); δ ∝ ∇_x Σ_b Σ_k w_bk softmax(z_t(x_b)/T)_k, rescaled per sample to
L2 norm √D·step/255 (D = C·H·W). T defaults to the method's distillation temperature.
confods: ods, each sample's step scaled by that teacher's max probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Draw, normalised, register_perturbation


def ods_delta(logits_fn, x01: torch.Tensor, w: torch.Tensor, *, step: float = 1.0, temperature: float = 1.0,
              confidence: bool = False) -> torch.Tensor:
    """ODS: ∇_x Σ_b Σ_k w_bk softmax(z(x_b)/T)_k, w (B, K) or one (K,) for every sample, rescaled to L2 norm √D·step/255 (times the
    max probability with `confidence`: ConfODS). `logits_fn` maps [0, 1] pixels to logits."""
    x = x01.detach().clone().requires_grad_()
    with torch.enable_grad():
        probs = F.softmax(logits_fn(x).float() / temperature, dim=-1)
        (grad,) = torch.autograd.grad((probs * w).sum(), x)
    return normalised(grad, step, probs.detach().amax(-1) if confidence else None)


def _ods(x01: torch.Tensor, draw: Draw, kind: str) -> torch.Tensor:
    i = int(torch.randint(draw.num_teachers(kind), (1,), generator=draw.choices))
    teacher = draw.teacher(i)
    K = getattr(draw.teachers, "num_classes", None) or teacher(x01[:1]).shape[-1]
    w = torch.rand(len(x01), K, generator=draw.noise, device=x01.device) * 2 - 1  # one direction per sample
    return ods_delta(teacher, x01, w, step=draw.step, temperature=draw.temperature, confidence=kind == "confods")


@register_perturbation("ods")
def ods(x01: torch.Tensor, draw: Draw) -> torch.Tensor:
    return _ods(x01, draw, "ods")


@register_perturbation("confods")
def confods(x01: torch.Tensor, draw: Draw) -> torch.Tensor:
    return _ods(x01, draw, "confods")
