"""The method contract: what every distillation method is to the engine.

A method is a small nn.Module that owns its trainable extras (discriminators,
regressors, gates). It declares what it needs from the teachers and the student,
and turns one batch's outputs into a loss and a dict of named terms to log. The
engine knows nothing else about it, and a user can call `loss` in their own loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from .. import plugins


# In a method's needs before bind(): "the model's stage-end taps", named once bind() resolves them.
# Declaring them early lets a teacher cache (logits only) be refused before any work starts.
STAGE_TAPS = "<stage ends>"


@dataclass(frozen=True)
class Needs:
    teacher_logits: bool = False
    teacher_taps: tuple[str, ...] = ()
    student_taps: tuple[str, ...] = ()
    perturbs_inputs: bool = False  # then teacher outputs cannot come from a cache
    # "train": the teachers normalise with each batch's statistics (their running ones untouched),
    # as MEAL's public code runs them; then BatchNorm is not folded and no cache can serve them.
    teacher_bn: str = "eval"

    @property
    def teachers(self) -> bool:
        return self.teacher_logits or bool(self.teacher_taps)


class StudentOutput(NamedTuple):
    logits: torch.Tensor
    taps: dict[str, torch.Tensor]


class TeacherOutput(NamedTuple):
    logits: torch.Tensor | None  # (M, B, K)
    taps: dict[str, list[torch.Tensor]]  # tap name -> one tensor per member


@dataclass
class MethodLoss:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


def class_targets(batch) -> torch.Tensor:
    """What a cross entropy on the batch compares with: the soft targets (B, K) of mixed views
    (mixup, CutMix: `batch.target`), else the labels `batch.y`."""
    target = getattr(batch, "target", None)
    return batch.y if target is None else target


def smooth_labels(targets: torch.Tensor, eps: float, multilabel: bool = False) -> torch.Tensor:
    """Label smoothing of (B, K) targets: (1-eps)·t + eps/K for a class distribution (one-hot or the
    soft targets of mixed views, as torch's cross_entropy smooths probabilities), (1-eps)·t + eps/2
    for independent multi-label targets (each class a two-way distribution, as TensorFlow's
    sigmoid_cross_entropy smooths)."""
    if not eps:
        return targets
    t = targets.float()
    return t * (1 - eps) + eps * (0.5 if multilabel else 1.0 / t.shape[-1])


def check_label_smoothing(value, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{method} option label_smoothing must be a number in [0, 1), got {value!r}")
    return float(value)


class Method(nn.Module):
    """Base class: subclasses set `needs` and implement `loss`."""

    needs: Needs = Needs()

    def loss(self, batch, student: StudentOutput, teachers: TeacherOutput | None) -> MethodLoss:
        raise NotImplementedError

    def bind(self, student: nn.Module, teachers=None, example_x: torch.Tensor | None = None) -> None:
        """Called once by the engine before it builds the optimizer, so that a method can build
        parameters whose shapes depend on the models (e.g. hint regressors). `teachers` is the
        teacher set (or a list of modules), `example_x` a batch of inputs. Default: nothing."""

    def student_spec(self, arch: str, kwargs: dict, num_teachers: int | None = None) -> tuple[str, dict]:
        """The architecture the student is built as, from the configured one: a method that trains a
        network of its own shape (EnsembleNet's multi-headed one, LatentBE's BatchEnsemble with one
        member per teacher) rewrites it. Default: unchanged."""
        return arch, kwargs

    def deployable(self, model: nn.Module, inputs: Iterable[torch.Tensor] | None = None) -> nn.Module | None:
        """The plain network to ship when it is not the trained one (LatentBE's collapsed
        BatchEnsemble), evaluated beside it; None: the trained model is the product. `inputs`:
        training inputs (the first epoch's views, in order) a method may run the network on."""
        return None

    def teacher_indices(self, step: int, num_teachers: int, seed: int) -> list[int] | None:
        """The teachers this step needs, by index (None: all). The engine asks before running the
        teachers, so members left out cost nothing. The answer must depend on the arguments alone:
        then every DDP rank, and a resumed run, get the same. Default: all."""
        return None

    def param_groups(self) -> list[dict]:
        """The method's trainable parameters as optimizer groups. A group may set its own "lr"; the
        engine's schedule scales it by the same factor as the student's. Default: one group."""
        return [{"params": list(self.parameters())}]

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return []


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def add(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        METHODS[name] = cls
        cls.name = name
        return cls
    return add


def known_methods() -> list[str]:
    """Ours and those installed packages register as entry points (group ensemble_kd.methods)."""
    return sorted(set(METHODS) | set(plugins.names(plugins.METHODS)))


def method_class(name: str) -> type[Method]:
    """The class of method `name`, loading an installed plugin's on first use."""
    if name not in METHODS:
        cls = plugins.load(plugins.METHODS, name)
        if cls is None:
            raise ValueError(f"unknown method '{name}'; known methods: {', '.join(known_methods())}")
        if name not in METHODS:  # a plugin module may register itself on import instead
            if not (isinstance(cls, type) and issubclass(cls, Method)):
                raise ValueError(f"the entry point '{name}' of group {plugins.METHODS!r} is not a Method subclass")
            register_method(name)(cls)
    return METHODS[name]


def create_method(name: str, **options) -> Method:
    cls = method_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"method '{name}' got a bad option: {err}") from None
