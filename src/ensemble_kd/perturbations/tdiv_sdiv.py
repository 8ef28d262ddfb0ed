"""tdiv_sdiv: a pair (i, j) of members drawn per batch, the same for the teachers and the
BatchEnsemble student; div(x) = mean_b CE(sg(p_j), p_i); δ ∝ ∇_x (TDiv − SDiv) with the
student's BatchNorm in eval mode, one step of L2 norm √D·step/255 per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import eval_mode
from ..models import unwrap
from .base import Draw, normalised, register_perturbation


@register_perturbation("tdiv_sdiv")
def tdiv_sdiv(x01: torch.Tensor, draw: Draw) -> torch.Tensor:
    M = draw.num_teachers("tdiv_sdiv")
    if M < 2:
        raise ValueError("tdiv_sdiv draws a pair of members and needs at least 2 teachers")
    i, j = (int(v) for v in torch.randperm(M, generator=draw.choices)[:2])
    return tdiv_sdiv_delta(draw.teacher(i), draw.teacher(j),
                           lambda x: _student_members(draw.student, draw.normalise(x), M), (i, j), x01, step=draw.step)


def tdiv_sdiv_delta(teacher_i, teacher_j, student_members, pair: tuple[int, int], x01: torch.Tensor, *,
                    step: float = 1.0) -> torch.Tensor:
    """One step up ∇_x (TDiv − SDiv) of L2 norm √D·step/255 per sample: teachers i and j, and the
    student's members i and j (the same pair), with div = mean_b CE(sg(p_j), p_i)."""
    i, j = pair
    x = x01.detach().clone().requires_grad_()
    with torch.enable_grad():
        s = student_members(x)
        objective = _divergence(teacher_i(x), teacher_j(x)) - _divergence(s[i], s[j])
        (grad,) = torch.autograd.grad(objective, x)
    return normalised(grad, step)


def _divergence(z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
    """mean_b CE(sg(p_j), p_i) at T = 1."""
    return -(F.softmax(z_j.detach().float(), -1) * F.log_softmax(z_i.float(), -1)).sum(-1).mean()


def _student_members(student, x, M: int) -> torch.Tensor:
    """The (M, B, K) member logits of a BatchEnsemble student, its BatchNorm in eval mode."""
    net = unwrap(student)  # not through DDP: only the input's gradient is taken here
    if not hasattr(net, "forward_members"):
        raise ValueError("tdiv_sdiv needs a BatchEnsemble student (method latentbe) whose members pair with "
                         "the teachers")
    with eval_mode(net):
        out = net.forward_members(x)
    if out.shape[0] != M:
        raise ValueError(f"tdiv_sdiv pairs student members with teachers: {out.shape[0]} members, {M} teachers")
    return out
