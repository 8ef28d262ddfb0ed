"""Hinton KD from one teacher, and AVER: KD towards the ensemble's mean probabilities.

    L = (1 - λ)·CE(y, z_s) + λ·T²·KL(q || softmax(z_s / T))     (alpha = λ, the default form)
    L = γ·CE(y, z_s) + a·T²·KL(q || softmax(z_s / T))            (ce_weight = γ, kd_weight = a)

The second form is AE-KD's Eq. 7, whose AVER baseline is CE weight 1 plus λ = 0.9 times KD:
with those weights `aver` has the gradient of `aekd` at C = 1/M.

KD takes q = softmax(z_t / T) of one chosen teacher. AVER takes q = the mean of the
teachers' probabilities at temperature T, which gives the same gradients as the mean of
the per-teacher KD losses: KL(q || p) = Σ q log q - Σ q log p, and the second term is
linear in q. The two losses differ only by T² times the ensemble's Jensen-Shannon
divergence, H(mean p_m) - mean H(p_m), a constant for the student. Averaging logits,
q = softmax(mean z_m / T), is a different and weaker target; it is offered only as the
explicit option `target: logits`.

The T² factor keeps the soft term's gradient on the scale of the CE gradient as T grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, MethodLoss, Needs, register_method, class_targets

TARGETS = ("probs", "logits")


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(q || softmax(z_s / T)), summed over classes and averaged over the batch.

    `student_logits` and `teacher_probs` are (B, K); q is any distribution over the K
    classes (rows summing to 1; zeros allowed). This is `F.kl_div(..., reduction="batchmean")`.
    """
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    q = teacher_probs.float()
    kl = (torch.special.xlogy(q, q) - q * log_p).sum(-1)
    return temperature * temperature * kl.mean()


def teacher_kd_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """(M,) per-teacher KD losses T²·KL(p_m || p_s) (batch mean) from (B, K) and (M, B, K) logits.
    (M, B, K) student logits pair member m with teacher m (LatentBE's one-to-one losses)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # log_softmax is finite, so q = 0 adds 0, never NaN
    return temperature * temperature * kl.mean(-1)


def ensemble_target(teacher_logits: torch.Tensor, temperature: float, mode: str = "probs") -> torch.Tensor:
    """(B, K) target from (M, B, K) teacher logits: mean of softmax(z_m/T) ("probs", the
    ensemble's prediction) or softmax(mean z_m / T) ("logits")."""
    if mode == "probs":
        return F.softmax(teacher_logits.float() / temperature, dim=-1).mean(0)
    if mode == "logits":
        return F.softmax(teacher_logits.float().mean(0) / temperature, dim=-1)
    raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {mode!r}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def teacher_logits_of(teachers, method: str) -> torch.Tensor:
    """The (M, B, K) teacher logits, or an error that says they are missing."""
    if teachers is None or teachers.logits is None:
        raise ValueError(f"method '{method}' needs teacher logits, and the teacher output has none")
    if teachers.logits.dim() != 3:
        raise ValueError(f"teacher logits must be (M, B, K), got shape {tuple(teachers.logits.shape)}")
    return teachers.logits


def loss_weights(method: str, alpha, ce_weight, kd_weight) -> tuple[float, float]:
    """(CE weight, KD weight): (1 - alpha, alpha) by default (alpha 0.9), or ce_weight and kd_weight
    as given (AE-KD's Eq. 7 form); one form or the other, never both."""
    if ce_weight is None and kd_weight is None:
        alpha = check_fraction("alpha", 0.9 if alpha is None else alpha)
        return 1.0 - alpha, alpha
    if alpha is not None:
        raise ValueError(f"{method} takes alpha or ce_weight and kd_weight, not both: drop alpha")
    weights = []
    for name, value, default in (("ce_weight", ce_weight, 1.0), ("kd_weight", kd_weight, 0.9)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{method} option {name} must be a number >= 0, got {value!r}")
        weights.append(float(value))
    return weights[0], weights[1]


class _SoftTargetKD(Method):
    """ce_weight·CE + kd_weight·T²·KL(target || student); subclasses choose the target."""

    needs = Needs(teacher_logits=True)

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, ce_weight: float | None = None,
                 kd_weight: float | None = None):
        super().__init__()
        self.ce_weight, self.kd_weight = loss_weights(self.name, alpha, ce_weight, kd_weight)
        self.temperature = check_temperature(temperature)

    def target(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, batch, student, teachers) -> MethodLoss:
        q = self.target(teacher_logits_of(teachers, self.name))
        ce = F.cross_entropy(student.logits.float(), class_targets(batch))
        kd = kd_loss(student.logits, q, self.temperature)
        loss = self.ce_weight * ce + self.kd_weight * kd
        return MethodLoss(loss, {"ce": ce.detach(), "kd": kd.detach(), "loss": loss.detach()})


@register_method("kd")
class KD(_SoftTargetKD):
    """Hinton et al. 2015 with one teacher, the member at index `teacher`."""

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, teacher: int = 0,
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(alpha, temperature, ce_weight, kd_weight)
        if isinstance(teacher, bool) or not isinstance(teacher, int) or teacher < 0:
            raise ValueError(f"teacher must be a member index (an integer >= 0), got {teacher!r}")
        self.teacher = teacher

    def bind(self, student, teachers=None, example_x=None) -> None:
        if teachers is not None:  # a teacher set or cache: its size is known before any step
            self._check_index(len(teachers))

    def _check_index(self, members: int) -> None:
        if self.teacher >= members:
            raise ValueError(f"kd option teacher={self.teacher}, but there are only {members} teachers "
                             f"(indices 0-{members - 1})")

    def target(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        self._check_index(teacher_logits.shape[0])
        return F.softmax(teacher_logits[self.teacher].float() / self.temperature, dim=-1)


@register_method("aver")
class Aver(_SoftTargetKD):
    """KD towards the ensemble: the mean of the teachers' probabilities at temperature T."""

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, target: str = "probs",
                 ce_weight: float | None = None, kd_weight: float | None = None):
        super().__init__(alpha, temperature, ce_weight, kd_weight)
        if target not in TARGETS:
            raise ValueError(f"aver option target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.target_mode = target

    def target(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        return ensemble_target(teacher_logits, self.temperature, self.target_mode)
