"""Input perturbations for distillation (Nam et al., ICML 2022): where teachers disagree, the
student learns to disagree too. Applied to a batch before the teachers and the student see it.

Every kind works in pixel space: the batch is un-normalised to [0, 1] with the loader's mean and
std, moved by the kind's δ, clipped to [0, 1] and normalised again. `step` is in units of 1/255
and `fraction` of each batch (its first rows; batches are shuffled) is replaced by perturbed
copies. A kind is a function `delta(x01, draw) -> δ` registered under its name (gaussian.py,
ods.py, tdiv_sdiv.py); `draw` carries the models and the step's seeded generators. Draws come
from (seed, step), so every rank and a resumed run perturb alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..data import Batch, hash_ints

_STREAM = 0x0D5
PERTURBATIONS: dict[str, Callable] = {}


def register_perturbation(name: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        if name in PERTURBATIONS or name == "none":
            raise ValueError(f"perturbation '{name}' is registered twice")
        PERTURBATIONS[name] = fn
        return fn
    return add


@dataclass(frozen=True)
class Draw:
    """What a kind's `delta` may use: the models, the pixel statistics, the step size and temperature,
    and two generators seeded from (seed, step): `noise` on the batch's device for tensors, `choices`
    on the CPU for member indices (reading them back from a GPU would sync it)."""

    teachers: object
    student: object
    mean: torch.Tensor
    std: torch.Tensor
    step: float
    temperature: float
    noise: torch.Generator
    choices: torch.Generator

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    def num_teachers(self, kind: str) -> int:
        members = getattr(self.teachers, "members", None)
        if members is None:
            raise ValueError(f"the {kind} perturbation differentiates through the teachers; a teacher "
                             f"cache cannot; unset teachers.cache")
        return len(members)

    def teacher(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Teacher i as a function of [0, 1] pixels, gradients flowing to them."""
        return lambda x01: self.teachers.member_forward(i, self.normalise(x01))


class Perturbation:
    def __init__(self, kind: str, *, step: float = 1.0, fraction: float = 1.0, temperature: float = 1.0,
                 mean=None, std=None):
        if kind != "none" and kind not in PERTURBATIONS:
            raise ValueError(f"perturbation kind must be one of none, {', '.join(PERTURBATIONS)}, got {kind!r}")
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
        draw = Draw(teachers, student, mean, std, self.step, self.temperature,
                    noise=torch.Generator(device=x.device).manual_seed(h), choices=torch.Generator().manual_seed(h))
        delta = PERTURBATIONS[self.kind](x01, draw)
        moved = ((x01 + delta).clamp(0.0, 1.0) - mean) / std
        return batch._replace(x=torch.cat([moved.to(x.dtype), x[n:]]) if n < len(x) else moved.to(x.dtype))


def normalised(grad: torch.Tensor, step: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's gradient rescaled to L2 norm √D·step/255 (times `scale` per sample)."""
    flat = grad.flatten(1)
    norm = flat.norm(dim=1).clamp_min(1e-12)
    size = math.sqrt(flat.shape[1]) * step / 255
    factor = size / norm if scale is None else size * scale / norm
    return grad * factor.view(-1, *([1] * (grad.dim() - 1)))
