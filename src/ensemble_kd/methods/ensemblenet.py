"""EnsembleNet: a multi-headed network trained end to end, its heads teaching each other.

No teachers: the student is `create("multihead", base=<student.arch>, ...)` (models/multihead.py),
N branches after a shared trunk, and its prediction is the ensembler's p_ens from one pass.
With p_i each branch's probabilities, g the labels and l the loss (cross entropy by default):

    ensembling:      L = Σ_i (1-λ)·l(g, p_i) + N·λ·l(g, p_ens)          (λ may be negative)
    co-distillation: L = Σ_i μ·l(sg(p_ens), p_i) + N·l(g, p_ens)        (default; sg: stop-gradient)

With squared L2 for l and the mean ensembler the two are one loss at μ = 1-λ (without the
stop-gradient; the paper's Appendix A.1): Σ_i ||g-p_i||² = Σ_i ||p_i-p̄||² + N·||g-p̄||².
With the learned gate, the ensemble term's factor (N·λ, or N) multiplies the gradient that
reaches the branches through the gate's input instead, and the term enters the loss with
weight 1: the gate always learns to lower l(g, p_ens), even when λ < 0.

For multi-label models (the video DBoF) p_i = sigmoid and l is the binary cross entropy
summed over classes; everything else is the same.

`label_smoothing` ε (the paper's ImageNet runs: 0.1, section 4.1) smooths the ground truth g, so
it enters the terms l(g, ·) only: l(g, p_ens) and, in the ensembling structure, l(g, p_i). The
co-distillation targets p_ens are the network's own predictions, already soft: smoothing them
would pull the branches towards uniform on top of the labels' smoothing, which the paper's
label smoothing (TensorFlow's, on the one-hot labels) never does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models import unwrap
from ..models.multihead import ENSEMBLERS, MultiHeadNet, mix_log
from .base import (Method, MethodLoss, Needs, check_label_smoothing, class_targets, register_method,
                   smooth_labels)
from .gradients import scale_gradient

STRUCTURES = ("codistill", "ensembling")
LOSSES = ("ce", "l2")


class Probs:
    """Per-branch (or mixed) probabilities in log space: log p, and log(1 - p) for multi-label."""

    def __init__(self, log_p: torch.Tensor, log_not_p: torch.Tensor | None = None):
        self.log_p, self.log_not_p = log_p, log_not_p

    @classmethod
    def of_logits(cls, z: torch.Tensor, multilabel: bool = False) -> Probs:
        z = z.float()
        return cls(F.logsigmoid(z), F.logsigmoid(-z)) if multilabel else cls(F.log_softmax(z, -1))

    @property
    def p(self) -> torch.Tensor:
        return self.log_p.exp()

    def mix(self, weights: torch.Tensor | None = None, grad_scale: float = 1.0) -> Probs:
        """The mixture over the first (branch) axis: the mean, or weighted by (B, N) weights;
        `grad_scale` multiplies the gradient that reaches the branches through it."""
        def mixed(log_x):
            return mix_log(log_x if grad_scale == 1.0 else scale_gradient(log_x, grad_scale), weights)
        return Probs(mixed(self.log_p), None if self.log_not_p is None else mixed(self.log_not_p))

    def detach(self) -> Probs:
        return Probs(self.log_p.detach(), None if self.log_not_p is None else self.log_not_p.detach())

    def __getitem__(self, i) -> Probs:
        return Probs(self.log_p[i], None if self.log_not_p is None else self.log_not_p[i])


def pair_loss(target: torch.Tensor, probs: Probs, kind: str = "ce") -> torch.Tensor:
    """l(target, p), batch mean. ce: -Σ t log p (multi-label: binary CE summed over classes);
    l2: Σ (t - p)². `target` is (B, K) probabilities (one-hot or multi-hot labels, or p_ens)."""
    t = target.float()
    if kind == "l2":
        return (t - probs.p).pow(2).sum(-1).mean()
    if kind != "ce":
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    per_row = -(t * probs.log_p).sum(-1)
    if probs.log_not_p is not None:
        per_row = per_row - ((1 - t) * probs.log_not_p).sum(-1)
    return per_row.mean()


def ensembling_loss(branches: Probs, g: torch.Tensor, lam: float, kind: str = "ce",
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Σ_i (1-λ)·l(g, p_i) + N·λ·l(g, p_ens); with gate weights, N·λ scales the gradient instead."""
    N = branches.log_p.shape[0]
    own = sum(pair_loss(g, branches[i], kind) for i in range(N))
    if weights is None:
        ens = pair_loss(g, branches.mix(), kind)
        total = (1 - lam) * own + N * lam * ens
    else:
        ens = pair_loss(g, branches.mix(weights, grad_scale=N * lam), kind)
        total = (1 - lam) * own + ens
    return total, {"branches": own.detach(), "ensemble": ens.detach()}


def codistillation_loss(branches: Probs, g: torch.Tensor, mu: float, kind: str = "ce",
                        weights: torch.Tensor | None = None, stop_gradient: bool = True) -> tuple[torch.Tensor, dict]:
    """Σ_i μ·l(sg(p_ens), p_i) + N·l(g, p_ens); with gate weights, N scales the gradient instead."""
    N = branches.log_p.shape[0]
    mixed = branches.mix(weights, grad_scale=1.0 if weights is None else N)
    target = mixed.detach().p if stop_gradient else mixed.p
    aux = sum(pair_loss(target, branches[i], kind) for i in range(N))
    ens = pair_loss(g, mixed, kind)
    total = mu * aux + (N if weights is None else 1) * ens
    return total, {"distill": aux.detach(), "ensemble": ens.detach()}


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"ensemblenet option {name} must be a finite number, got {value!r}")
    return float(value)


@register_method("ensemblenet")
class EnsembleNet(Method):
    """Co-distillation (default) or the ensembling loss over a multi-headed student.

    Loss options: structure (codistill | ensembling), mu (2), lam (0; negative allowed), loss
    (ce | l2), stop_gradient (True), label_smoothing (0; on g only). Network options, passed to the
    multi-head builder in place of the student's architecture: branches (2), fork (a stage name;
    default the last stage), width_factor (default: the smallest that keeps the net no larger than
    the base) or branch_widths (the branched stages' widths in the base's width config), ensembler
    (mean | gate), branch_kwargs.
    """

    def __init__(self, structure: str = "codistill", mu: float = 2.0, lam: float = 0.0, loss: str = "ce",
                 stop_gradient: bool = True, branches: int = 2, fork: str | None = None,
                 width_factor: float | None = None, ensembler: str = "mean", branch_kwargs: dict | None = None,
                 branch_widths: list[int] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"ensemblenet option structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
        if loss not in LOSSES:
            raise ValueError(f"ensemblenet option loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if ensembler not in ENSEMBLERS:
            raise ValueError(f"ensemblenet option ensembler must be one of {', '.join(ENSEMBLERS)}, got {ensembler!r}")
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise ValueError(f"ensemblenet option branches must be a positive integer, got {branches!r}")
        if not isinstance(stop_gradient, bool):
            raise ValueError(f"ensemblenet option stop_gradient must be true or false, got {stop_gradient!r}")
        self.structure, self.kind, self.stop_gradient = structure, loss, stop_gradient
        self.mu, self.lam = _number("mu", mu), _number("lam", lam)
        self.label_smoothing = check_label_smoothing(label_smoothing, "ensemblenet")
        if branch_widths is not None and width_factor is not None:
            raise ValueError("ensemblenet takes branch_widths or width_factor, not both; drop one of them")
        if branch_kwargs is not None and not isinstance(branch_kwargs, dict):
            raise ValueError(f"ensemblenet option branch_kwargs must be a mapping (e.g. {{num_experts: 3}}), "
                             f"got {branch_kwargs!r}")
        self.network = {"branches": branches, "fork": fork, "width_factor": width_factor, "ensembler": ensembler,
                        "branch_kwargs": branch_kwargs, "branch_widths": branch_widths}
        self.needs = Needs(student_taps=("heads", "ensembler") if ensembler == "gate" else ("heads",))
        self.multilabel = False

    def student_spec(self, arch: str, kwargs: dict, num_teachers: int | None = None) -> tuple[str, dict]:
        if arch == "multihead":  # already multi-headed: keep it as configured
            return arch, kwargs
        return "multihead", {"base": arch, "base_kwargs": dict(kwargs),
                             **{k: v for k, v in self.network.items() if v is not None}}

    def bind(self, student, teachers=None, example_x=None) -> None:
        net = unwrap(student)
        if not isinstance(net, MultiHeadNet):
            raise ValueError(f"ensemblenet trains a multi-headed network, got {type(net).__name__}; build the "
                             f"student with create('multihead', base=...) (the distill command does)")
        gate = net.ensembler is not None
        self.needs = Needs(student_taps=("heads", "ensembler") if gate else ("heads",))
        self.multilabel = net.multilabel

    def loss(self, batch, student, teachers=None) -> MethodLoss:
        if "heads" not in student.taps:
            raise ValueError("ensemblenet needs the student's 'heads' tap: the (N, B, K) branch logits")
        z = student.taps["heads"]
        weights = student.taps.get("ensembler")
        branches = Probs.of_logits(z, self.multilabel)
        if self.multilabel:
            g = batch.y.float()
        else:  # one-hot labels, or the soft targets of mixed views
            targets = class_targets(batch)
            g = targets.float() if targets.dim() == 2 else F.one_hot(targets, z.shape[-1]).float()
        g = smooth_labels(g, self.label_smoothing, self.multilabel)  # the labels only: see the module's note
        if self.structure == "ensembling":
            loss, logs = ensembling_loss(branches, g, self.lam, self.kind, weights)
        else:
            loss, logs = codistillation_loss(branches, g, self.mu, self.kind, weights, self.stop_gradient)
        logs["loss"] = loss.detach()
        return MethodLoss(loss, logs)
