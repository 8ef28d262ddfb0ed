"""Every model an entry trains, built at full size on the meta device (no memory, no data): its
parameters (also with batch norm folded, EnsembleNet's convention) and multiply-accumulates."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError
from ..metrics.cost import count_macs, count_parameters, count_parameters_bn_folded
from ..models import create


@dataclass(frozen=True)
class Built:
    role: str  # "teacher 0", "student <variant>"
    arch: str
    params: int
    folded: int  # batch norm folded (EnsembleNet's #Params: metrics.cost.count_parameters_bn_folded)
    macs: int | None  # None: the model's cost depends on its input's values (video frames)


@functools.lru_cache(maxsize=256)
def _measure(arch: str, kwargs: tuple, num_classes: int, input_shape: tuple) -> tuple[int, int, int | None]:
    in_channels = input_shape[0] if len(input_shape) == 3 else input_shape[-1]
    try:
        with torch.device("meta"):
            model = create(arch, num_classes=num_classes, in_channels=in_channels, **{k: _thawed(v) for k, v in kwargs})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model '{arch}' with {dict(kwargs)}: {err}") from None
    try:
        macs = count_macs(model, input_shape)
    except (NotImplementedError, RuntimeError):  # a video model reads its frames' values (padding)
        macs = None
    return count_parameters(model), count_parameters_bn_folded(model), macs


def _frozen(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value):
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
        return {k: _thawed(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def measure(role: str, arch: str, kwargs: dict, num_classes: int, input_shape: tuple) -> Built:
    params, folded, macs = _measure(arch, _frozen(kwargs), num_classes, tuple(input_shape))
    return Built(role, arch, params, folded, macs)


def teacher_sizes(config: Config, num_classes: int, input_shape: tuple) -> list[Built]:
    return [measure(f"teacher {i}", m.arch, m.kwargs, num_classes, input_shape)
            for i, m in enumerate(config.teachers.resolved_members())]


def student_size(variant: str, config: Config, method, num_classes: int, input_shape: tuple) -> Built:
    """The network the method trains (EnsembleNet's multi-headed one, LatentBE's BatchEnsemble)."""
    members = len(config.teachers.resolved_members())
    teachers = min(config.teachers.take or members, members) if method.needs.teachers else None
    arch, kwargs = method.student_spec(config.student.arch, config.student.kwargs, teachers)
    return measure(f"student {variant}", arch, kwargs, num_classes, input_shape)
