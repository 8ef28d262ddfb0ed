"""AE-KD: adaptive ensemble KD in gradient space (Du et al., NeurIPS 2020).

Each teacher m pulls the student along its own KD gradient g_m. AE-KD weighs the teachers
by the point of the "capped" convex hull of those gradients nearest the origin:

    α* = argmin ||Σ_m α_m g_m||²   subject to  Σ_m α_m = 1,  0 ≤ α_m ≤ C,

C in [1/M, 1]: C = 1/M forces uniform weights (AVER), C = 1 is the MGDA min-norm point.
Loss: γ·CE + a·Σ_m α_m ℓ_m (+ β·Σ_m α'_m h_m in the feature variant), α constants.

What g_m is. ℓ_m = T²·KL(p_m || p_s) averaged over the batch. Its gradient with respect
to the student logits is analytic, T·(p_s - p_m)/B per sample, so no backward pass is
needed. `grad_reduction` says what g_m is made of:
- "sample" (default, our choice): that (B, K) gradient flattened to B·K numbers, the gradient of
  the batch-mean loss at every logit of the batch. Keeping the samples apart lets teachers that
  disagree on different samples count as disagreeing.
- "batch" (the authors' code): the gradient averaged over the batch to one K-vector per teacher
  (their find_optimal_svm takes the mean over dim 1 of the (M, B, K) logit gradients), so teachers
  that disagree on different samples can cancel out; the hint gradients are averaged the same way
  and normalised to unit norm before the solve, the weights then divided by those norms and
  summed to 1 (their is_norm=True for the hint term, which may leave a weight above C).

The solver (`solvers/capped_simplex.py`, `teacher_weights`): the M x M Gram G = g gᵀ is formed
on the device in float64 and solved exactly, on the host by an active-set method (one copy of G,
the step's one sync) or on the device by enumerating the faces (M ≤ 8, no sync); the default, auto,
solves on the device on a GPU and on the host on the CPU (faster there, with nothing to wait for). The public code runs a
one-class SVM (LIBSVM's ν-SVM on the precomputed Gram) instead, which fails for C = 1/M and for
one teacher, and at the native scale of logit gradients (Gram entries near 1e-7) stops at its
starting point.

The authors' defaults, where ours differ: their hint taps the student's second stage
(--hint_layer 2, i.e. `layer2`; ours, unset, is the last stage) and the hint term is left out of
the loss in the first epoch (ours is in from the first step). Set `student_tap`/`teacher_tap` to
`layer2` to follow the first.

Feature variant (FitNets hints): one regressor per teacher, conv 1x1 (or 3x3) + BN, maps
the student's feature f_s to teacher m's channels, average-pooled to teacher m's spatial
size; h_m = ½·mean((f_m - r_m(f_s))²) over all elements (batch, channels, positions).
A feature is a map (B, C, H, W), a vector (B, C) (a 1x1 map), or a vision transformer's
tokens (B, N, C), read as the map (B, C, h, w) of its patch tokens (models/tokens.py: the
prefix tokens dropped), so ViT and CNN teachers and students hint each other in any mix.
Its weights α' come from the gradients of h_m at the shared f_s, read in one autograd
call through the regressors only (the student's backbone is not traversed).

Under torch.distributed every rank uses the same weights, those of the global batch: with
"sample", g_m is the concatenation of the per-sample gradients, so the global Gram is
proportional to the mean of the ranks' Grams (equal per-rank batches), which is what is averaged
(the weights do not depend on the Gram's scale); with "batch", the batch-mean gradients themselves
are averaged over ranks before the Gram is formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce_mean
from ..metrics import eval_mode
from ..models import default_taps, forward_with_taps, resolve_module, unwrap
from ..models.tokens import TapLayout, tap_layout, to_map
from ..solvers.capped_simplex import SOLVERS, gram_matrix, teacher_weights
from .base import STAGE_TAPS, Method, MethodLoss, Needs, register_method, class_targets
from .kd import check_temperature, teacher_kd_losses, teacher_logits_of

VARIANTS = ("logits", "features")
GRAD_REDUCTIONS = ("sample", "batch")


# --------------------------------------------------------------------------- gradients
def kd_logit_gradients(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """(M, B, K) gradients of each teacher's batch-mean KD loss T²·KL(p_m || p_s) with respect
    to the student logits: T·(p_s - p_m)/B. (d/dz of -Σ p_m log softmax(z/T) is (p_s - p_m)/T.)"""
    T = temperature
    p_s = F.softmax(student_logits.detach().float() / T, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=-1)
    return (T / student_logits.shape[0]) * (p_s - p_t)


def batch_mean_weights(grads: list[torch.Tensor], C: float, normalised: list[bool],
                       solver: str = "auto") -> torch.Tensor:
    """The authors' weights: each set's (M, B, ...) gradients averaged over the batch (and over ranks)
    to (M, D) vectors; a `normalised` set's vectors are scaled to unit norm before the solve and its
    weights divided by those norms after, then summed to 1. (len(grads), M) float64."""
    means = [g.detach().double().mean(1).flatten(1) for g in grads]
    means = all_reduce_mean(torch.cat(means, 1)).split([m.shape[1] for m in means], 1)  # one collective
    norms = [m.norm(dim=1).clamp_min(1e-300) if unit else None for m, unit in zip(means, normalised)]
    grams = torch.stack([gram_matrix(m if n is None else m / n[:, None]) for m, n in zip(means, norms)])
    alphas = teacher_weights(grams, C, solver=solver)
    rows = [a if n is None else (a / n) / (a / n).sum() for a, n in zip(alphas, norms)]
    return torch.stack(rows)


def hint_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½·mean((target - prediction)²) over every element, in float32."""
    return 0.5 * (target.float() - prediction.float()).pow(2).mean()


class Regressor(nn.Module):
    """Conv (1x1 or 3x3) + BN from student to teacher channels, pooled to the teacher's H x W.

    (B, C) features are treated as (B, C, 1, 1): the conv is then a linear layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.bn(self.conv(_as_map(x)))
        return out if tuple(out.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(out, size)


def _as_map(x: torch.Tensor, layout: TapLayout = None, where: str = "a hint feature") -> torch.Tensor:
    """A hint feature as (B, C, H, W): a map (channels-last ones permuted), a vector as 1x1, ViT
    tokens by their model's layout."""
    try:
        x = to_map(x, layout)
    except ValueError as err:
        raise ValueError(f"aekd (features): {where} gives tokens of shape {tuple(x.shape)}, but {err}") from None
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[:, :, None, None]
    raise ValueError(f"aekd (features): {where} gives shape {tuple(x.shape)}; a hint feature must be a map "
                     f"(B, C, H, W), a vector (B, C), or the tokens (B, N, C) of a timm or torchvision "
                     f"VisionTransformer, whose token layout bind() reads from the model")


def _last_stage(model: nn.Module, who: str, option: str) -> str:
    try:
        return default_taps(model)[-2]
    except (ValueError, IndexError):
        raise ValueError(f"aekd (features): the {who} has no tap_points; set the option '{option}' "
                         f"to a module path") from None


def _channels(model: nn.Module, path: str, example_x, who: str) -> int:
    """The channel count of the output at `path`: from a forward pass on `example_x` when
    given (in eval mode, no grad, so BN statistics stay untouched), else from the model's
    stage_channels."""
    if example_x is not None:
        with eval_mode(model), torch.no_grad():  # the module inside DDP: its forward would be a collective
            _, taps = forward_with_taps(unwrap(model), example_x[:2], (path,))
        return int(_as_map(taps[path], tap_layout(model, path), f"{who}'s tap '{path}'").shape[1])
    inner = unwrap(model)
    points, channels = getattr(inner, "tap_points", None), getattr(inner, "stage_channels", None)
    if points is not None and channels is not None and path in points:
        return int(channels[list(points).index(path)])
    raise ValueError(f"aekd (features): cannot tell the channels of {who}'s '{path}'; pass "
                     f"example_x to bind(), or the options student_channels and teacher_channels")


# --------------------------------------------------------------------------- the method
@register_method("aekd")
class AEKD(Method):
    """γ·CE + a·Σ α_m ℓ_m [+ β·Σ α'_m h_m], weights from the min-norm point of the gradients.

    Options: C (cap, in [1/M, 1]), temperature T, ce_weight γ, kd_weight a, variant
    ("logits" or "features"), solver ("host": the active-set method, one copy of the Gram per
    step, a sync on a GPU; "device": the same optimum from every face at once where the Gram is, for
    M <= 8, no sync; "auto", the default: device on a GPU, host on the CPU),
    grad_reduction ("sample": per-sample gradients; "batch": batch-mean ones, as the authors); for
    features: hint_weight β, student_tap and teacher_tap (module paths; default the last stage),
    regressor_kernel (1 or 3), and optionally student_channels / teacher_channels (one per
    teacher) to build the regressors without bind(). The feature variant owns one regressor per teacher; the engine calls
    `bind(student, teachers, example_x)` once before building the optimizer.
    """

    def __init__(self, C: float = 0.6, temperature: float = 4.0, ce_weight: float = 1.0,
                 kd_weight: float = 0.9, variant: str = "logits", hint_weight: float = 1.0,
                 student_tap: str | None = None, teacher_tap: str | None = None,
                 regressor_kernel: int = 1, student_channels: int | None = None,
                 teacher_channels: list[int] | None = None, solver: str = "auto", grad_reduction: str = "sample"):
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"aekd option solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        self.solver = solver
        if grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(f"aekd option grad_reduction must be one of {', '.join(GRAD_REDUCTIONS)}, "
                             f"got {grad_reduction!r}")
        self.grad_reduction = grad_reduction
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not 0.0 < C <= 1.0:
            raise ValueError(f"aekd option C must be in (0, 1] (and at least 1/M), got {C!r}")
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("hint_weight", hint_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"aekd option {name} must be a number >= 0, got {value!r}")
        if variant not in VARIANTS:
            raise ValueError(f"aekd option variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if regressor_kernel not in (1, 3):
            raise ValueError(f"aekd option regressor_kernel must be 1 or 3, got {regressor_kernel!r}")
        for name, value in (("student_tap", student_tap), ("teacher_tap", teacher_tap)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"aekd option {name} must be a module path string, got {value!r}")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("aekd options student_channels and teacher_channels go together")
        self.C, self.temperature = float(C), check_temperature(temperature)
        self.ce_weight, self.kd_weight, self.hint_weight = float(ce_weight), float(kd_weight), float(hint_weight)
        self.variant, self.kernel = variant, regressor_kernel
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.regressors = nn.ModuleList()
        # The taps' layouts (models/tokens.py: ViT tokens, channels-last maps), read at bind.
        self.student_layout: TapLayout = None
        self.teacher_layouts: list[TapLayout] = []
        self.needs = Needs(teacher_logits=True)
        if variant == "features" and student_channels is not None:
            if isinstance(teacher_channels, int) or not all(isinstance(c, int) and c > 0 for c in teacher_channels):
                raise ValueError(f"aekd option teacher_channels must be a list of channel counts, one per "
                                 f"teacher, got {teacher_channels!r}")
            self._build(int(student_channels), [int(c) for c in teacher_channels])
        self._set_needs()

    # ------------------------------------------------------------------ setup
    def _build(self, student_channels: int, teacher_channels: list[int]) -> None:
        self.regressors = nn.ModuleList(Regressor(student_channels, c, self.kernel) for c in teacher_channels)

    def _set_needs(self) -> None:
        if self.variant == "features":  # unset taps: the last stage, resolved at bind
            self.needs = Needs(teacher_logits=True, teacher_taps=(self.teacher_tap or STAGE_TAPS,),
                               student_taps=(self.student_tap or STAGE_TAPS,))

    def bind(self, student: nn.Module, teachers=None, example_x: torch.Tensor | None = None) -> None:
        """Check C against the teachers' number; resolve the taps and build the regressors (features variant)."""
        if teachers is not None:
            self._check_C(len(teachers))
        if self.variant != "features":
            return
        if teachers is None:
            raise ValueError("aekd (features) needs the teachers to build its regressors")
        if not hasattr(teachers, "members") and not isinstance(teachers, (list, tuple, nn.ModuleList)):
            raise ValueError("aekd (features) needs teacher taps, which a teacher cache does not hold; "
                             "unset teachers.cache to run the teachers online")
        members = list(getattr(teachers, "members", teachers))
        self.student_tap = self.student_tap or _last_stage(student, "student", "student_tap")
        self.teacher_tap = self.teacher_tap or _last_stage(members[0], "first teacher", "teacher_tap")
        resolve_module(student, self.student_tap)
        for i, m in enumerate(members):
            try:
                resolve_module(m, self.teacher_tap)
            except ValueError as err:
                raise ValueError(f"aekd (features): teacher {i} has no module '{self.teacher_tap}'; "
                                 f"every teacher needs it: set teacher_tap to a path they share ({err})") from None
        self.student_layout = tap_layout(student, self.student_tap)
        self.teacher_layouts = [tap_layout(m, self.teacher_tap) for m in members]
        c_s = _channels(student, self.student_tap, example_x, "the student")
        c_t = [_channels(m, self.teacher_tap, example_x, f"teacher {i}") for i, m in enumerate(members)]
        built = [(r.conv.in_channels, r.conv.out_channels) for r in self.regressors]
        if built != [(c_s, c) for c in c_t]:
            if built:
                raise ValueError(f"aekd (features): the regressors were built for (student, teacher) "
                                 f"channels {built}, but the models have {[(c_s, c) for c in c_t]}")
            self._build(c_s, c_t)
        device = next((p.device for p in student.parameters()), None)
        if device is not None:
            self.regressors.to(device)
        self._set_needs()

    def _check_C(self, M: int) -> None:
        if not self.C >= 1.0 / M - 1e-12:
            raise ValueError(f"aekd option C={self.C} is below 1/M = {1.0 / M:.4g} for {M} teachers; "
                             f"use C in [1/M, 1] (C = 1/M gives uniform weights)")

    # ------------------------------------------------------------------ loss
    def loss(self, batch, student, teachers) -> MethodLoss:
        z_t = teacher_logits_of(teachers, "aekd")
        M = z_t.shape[0]
        self._check_C(M)
        z_s = student.logits
        ce = F.cross_entropy(z_s.float(), class_targets(batch))
        kd_terms = teacher_kd_losses(z_s, z_t, self.temperature)  # (M,)
        grads = [kd_logit_gradients(z_s, z_t, self.temperature)]
        if self.variant == "features":
            hints, hint_grads = self._hints(student, teachers, M)
            grads.append(hint_grads)
        alphas = self._weights(grads, M)  # (1 or 2, M), constants
        kd = (alphas[0].to(kd_terms.dtype) * kd_terms).sum()
        loss = self.ce_weight * ce + self.kd_weight * kd
        logs = {"ce": ce.detach(), "kd": kd.detach()}
        logs.update({f"alpha_{i}": a for i, a in enumerate(alphas[0])})
        if self.variant == "features":
            hint = (alphas[1].to(hints.dtype) * hints).sum()
            loss = loss + self.hint_weight * hint
            logs["hint"] = hint.detach()
            logs.update({f"hint_alpha_{i}": a for i, a in enumerate(alphas[1])})
        logs["loss"] = loss.detach()
        return MethodLoss(loss, logs)

    def _weights(self, grads: list[torch.Tensor], M: int) -> torch.Tensor:
        """(len(grads), M) float32 weights on the device: one all-reduce of the Gram matrices
        under torch.distributed, at most one copy to the host and one back, however many sets."""
        if self.grad_reduction == "batch":  # the logit set as is, the hint set normalised, as the authors
            return batch_mean_weights(grads, self.C, [k == 1 for k in range(len(grads))], self.solver).float()
        grams = all_reduce_mean(torch.stack([gram_matrix(g) for g in grads]))  # same alpha on every rank
        return teacher_weights(grams, self.C, solver=self.solver).float()

    def _hints(self, student, teachers, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) hint losses h_m (graph tensors) and (M, ...) their gradients at f_s."""
        if not self.regressors or self.student_tap is None or self.teacher_tap is None:
            raise ValueError("aekd (features) has no regressors yet: call method.bind(student, teachers, "
                             "example_x) before building the optimizer (the engine does), or pass the "
                             "options student_tap, teacher_tap, student_channels and teacher_channels")
        if len(self.regressors) != M:
            raise ValueError(f"aekd (features) has {len(self.regressors)} regressors but got {M} teachers")
        if self.student_tap not in student.taps or self.teacher_tap not in teachers.taps:
            raise ValueError(f"aekd (features) needs the student tap '{self.student_tap}' and the teacher "
                             f"tap '{self.teacher_tap}' in the outputs it was given")
        f_s = _as_map(student.taps[self.student_tap], self.student_layout, f"the student's tap '{self.student_tap}'")
        layouts = self.teacher_layouts or [None] * M  # regressors given as options, never bound: plain maps
        targets = [_as_map(f, layout, f"teacher {i}'s tap '{self.teacher_tap}'").detach()
                   for i, (f, layout) in enumerate(zip(teachers.taps[self.teacher_tap], layouts))]
        with torch.enable_grad():
            src = f_s if f_s.requires_grad else f_s.detach().requires_grad_()
            # One view of f_s per regressor: the gradient at view m is the gradient of h_m at f_s.
            inputs = [src.view_as(src) for _ in range(M)]
            hints = torch.stack([hint_loss(r(x, f.shape[-2:]), f)
                                 for r, x, f in zip(self.regressors, inputs, targets)])
            grads = torch.autograd.grad(hints.sum(), inputs, retain_graph=True)
        return hints, torch.stack(grads)
