"""Input perturbations for distillation (Nam et al., ICML 2022): where teachers disagree, the
student learns to disagree too. Applied to a batch before the teachers and the student see it.

Every kind works in pixel space: the batch is un-normalised to [0, 1] with the loader's mean and
std, moved, clipped to [0, 1] and normalised again. `step` is in units of 1/255 and `fraction`
of each batch (its first rows; batches are shuffled) is replaced by perturbed copies.

- gaussian: x + N(0, 1)·step/255.
- ods (output diversified sampling): one teacher drawn per batch and w ~ U(-1, 1)^K;
  δ ∝ ∇_x Σ_k w_k softmax(z_t(x)/T)_k, rescaled per sample to L2 norm √D·step/255 (D = C·H·W).
- confods: ods, each sample's step scaled by that teacher's max probability.
- tdiv_sdiv: a pair (i, j) of members drawn per batch, the same for the teachers and the
  BatchEnsemble student; div(x) = mean_b CE(sg(p_j), p_i); δ ∝ ∇_x (TDiv − SDiv) with the
  student's BatchNorm in eval mode, one step of L2 norm √D·step/255 per sample.
Draws come from (seed, step), so every rank and a resumed run perturb alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import Batch, hash_ints
from ..metrics import eval_mode
from ..models import unwrap

KINDS = ("none", "gaussian", "ods", "confods", "tdiv_sdiv")
_STREAM = 0x0D5


class Perturbation:
    def __init__(self, kind: str, *, step: float = 1.0, fraction: float = 1.0, temperature: float = 1.0,
                 mean=None, std=None):
        if kind not in KINDS:
            raise ValueError(f"perturbation kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not step > 0 or not 0 < fraction <= 1 or not temperature > 0:
            raise ValueError(f"perturbation needs step > 0, fraction in (0, 1] and temperature > 0, got "
                             f"{step}, {fraction} and {temperature}")
        if mean is None or std is None:
            raise ValueError("perturbations work in pixel space and need the loader's mean and std (image data)")
        self.kind, self.step, self.fraction, self.temperature = kind, float(step), float(fraction), float(temperature)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: Batch, teachers, student, *, step: int, seed: int) -> Batch:
        if self.kind == "none":
            return batch
        x = batch.x
        n = max(1, math.ceil(self.fraction * len(x)))
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        x01 = (x[:n].float() * std + mean).detach()
        h = int(hash_ints(seed, step, _STREAM))
        gen = torch.Generator(device=x.device).manual_seed(h)  # tensors, drawn where they are used
        if self.kind == "gaussian":
            delta = torch.randn(x01.shape, generator=gen, device=x.device) * (self.step / 255)
        else:  # member choices from a CPU generator: reading them back would sync a GPU
            delta = self._gradient_step(x01, mean, std, teachers, student, gen, torch.Generator().manual_seed(h))
        moved = ((x01 + delta).clamp(0.0, 1.0) - mean) / std
        return batch._replace(x=torch.cat([moved.to(x.dtype), x[n:]]) if n < len(x) else moved.to(x.dtype))

    def _gradient_step(self, x01, mean, std, teachers, student, gen, choices) -> torch.Tensor:
        members = getattr(teachers, "members", None)
        if members is None:
            raise ValueError(f"the {self.kind} perturbation differentiates through the teachers; a teacher "
                             f"cache cannot; unset teachers.cache")
        M = len(members)

        def teacher(i):
            return lambda x: teachers.member_forward(i, (x - mean) / std)
        if self.kind in ("ods", "confods"):
            i = int(torch.randint(M, (1,), generator=choices))
            K = getattr(teachers, "num_classes", None) or teachers.member_forward(i, (x01[:1] - mean) / std).shape[-1]
            w = torch.rand(K, generator=gen, device=x01.device) * 2 - 1
            return ods_delta(teacher(i), x01, w, step=self.step, temperature=self.temperature,
                             confidence=self.kind == "confods")
        if M < 2:
            raise ValueError("tdiv_sdiv draws a pair of members and needs at least 2 teachers")
        i, j = (int(v) for v in torch.randperm(M, generator=choices)[:2])
        return tdiv_sdiv_delta(teacher(i), teacher(j), lambda x: _student_members(student, (x - mean) / std, M),
                               (i, j), x01, step=self.step)


def ods_delta(logits_fn, x01: torch.Tensor, w: torch.Tensor, *, step: float = 1.0, temperature: float = 1.0,
              confidence: bool = False) -> torch.Tensor:
    """ODS: ∇_x Σ_k w_k softmax(z(x)/T)_k per sample, rescaled to L2 norm √D·step/255 (times the
    max probability with `confidence`: ConfODS). `logits_fn` maps [0, 1] pixels to logits."""
    x = x01.detach().clone().requires_grad_()
    with torch.enable_grad():
        probs = F.softmax(logits_fn(x).float() / temperature, dim=-1)
        (grad,) = torch.autograd.grad((probs * w).sum(), x)
    return _normalised(grad, step, probs.detach().amax(-1) if confidence else None)


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
    return _normalised(grad, step, None)


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


def _normalised(grad: torch.Tensor, step: float, scale: torch.Tensor | None) -> torch.Tensor:
    """Each sample's gradient rescaled to L2 norm √D·step/255 (times `scale` per sample)."""
    flat = grad.flatten(1)
    norm = flat.norm(dim=1).clamp_min(1e-12)
    size = math.sqrt(flat.shape[1]) * step / 255
    factor = size / norm if scale is None else size * scale / norm
    return grad * factor.view(-1, *([1] * (grad.dim() - 1)))
