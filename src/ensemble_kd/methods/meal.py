"""MEAL: multi-model ensemble via adversarial learning (Shen, He & Xue, AAAI 2019).

The student matches a teacher block by block. At each tap j (the end of a stage, and the
logits) both outputs are aligned to one length L_j, turned into distributions by a softmax,
and compared; a discriminator per tap learns to tell teacher from student:

    L = α·Σ_j γ_j·sim(softmax(a_s,j), softmax(a_t,j)) + β·Σ_j BCE(D_j, teacher vs student) [+ ce_weight·CE]

Alignment: a tap (B, C, H, W) is flattened to (B, C, H·W), adaptively pooled along the
positions to L_j and reduced over the channels (avg pooling with the channel mean, max pooling
with the channel max), giving (B, L_j); a vector tap (B, D), the logits included, is one channel.
Both reductions commute with the pooling, so the channels are reduced first: the same numbers
at 1/C of the pooling work. L_j defaults to the teacher tap's number of positions (1024, 256,
64 and K for a CIFAR ResNet's three stages and logits on 32x32 inputs). A vision transformer's
tokens (B, N, C) are first read as the map (B, C, h, w) of its patch tokens (models/tokens.py:
the prefix tokens dropped), so its positions are patches and its channels are reduced, as a CNN's;
a channels-last map (Swin's) is permuted to channels-first.

Discriminators: a 3-layer MLP d → d/k → d/k² → 2 (k = 2), ReLU after every layer, the last
included, as in the authors' code; BCE-with-logits against 2-class targets (student: [1, 0],
teacher: [0, 1]). Input layouts: "separate" (the authors' code) feeds the B student rows and the
B teacher rows as 2B samples of length L_j; "pair" (the paper's concatenation) feeds
[student, teacher] and [teacher, student], 2B samples of length 2·L_j, and D tells the order.
Objectives: "joint" (the authors' code) has the student and the discriminators minimise the
same BCE, in one optimizer, the discriminators at their own learning rate (disc_lr, default
1e-3): the term acts as a regulariser. "minimax" (the paper) reverses the gradient that reaches
the student, so the student maximises the BCE the discriminators minimise. "none" drops them.

Teachers: one drawn uniformly at random per iteration (Algorithm 1; `teacher_indices` draws it
from (seed, step), so every DDP rank and a resumed run draw the same, and the others are not
run at all), or "combine": every teacher, the similarity target being the mean of their
softmaxes and the discriminators' teacher sample the mean of their aligned vectors. The loss
uses whatever teachers it is given, so the two modes differ only in what the engine runs.
`teacher_bn: train` runs them on batch statistics, as the authors' code leaves them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import LOGITS, default_taps, forward_with_taps, resolve_module, unwrap
from ..models.tokens import TapLayout, tap_layout, to_map
from .base import STAGE_TAPS, Method, MethodLoss, Needs, register_method, class_targets
from .gradients import scale_gradient
from .kd import teacher_logits_of

SIMILARITIES = ("ce", "kl", "l1", "l2")
POOLS = ("avg", "max")
LAYOUTS = ("separate", "pair")
ADVERSARIAL = ("joint", "minimax", "none")
CHOICES = ("random", "combine")
TEACHER_BN = ("eval", "train")
# γ_j by number of taps (the last is the logits): the paper's lists for 3 and 5; 1, 2, 4 follow them.
TAP_WEIGHTS = {1: (1.0,), 2: (0.05, 1.0), 3: (0.01, 0.05, 1.0), 4: (0.01, 0.05, 0.1, 1.0),
               5: (0.001, 0.01, 0.05, 0.1, 1.0)}


# --------------------------------------------------------------------------- alignment
def align(tap: torch.Tensor, length: int, pool: str = "avg") -> torch.Tensor:
    """(B, C, *positions) or (B, D) -> (B, length) float32: pool the positions to `length`
    (adaptive avg or max; up- or down-sampling), reduce the channels (mean or max)."""
    if tap.dim() < 2:
        raise ValueError(f"a MEAL tap must be (B, D) or (B, C, ...), got shape {tuple(tap.shape)}")
    x = tap.float()
    x = x.unsqueeze(1) if x.dim() == 2 else x.flatten(2)  # (B, C, N)
    if pool == "avg":
        return F.adaptive_avg_pool1d(x.mean(1, keepdim=True), length).squeeze(1)
    if pool == "max":
        return F.adaptive_max_pool1d(x.amax(1, keepdim=True), length).squeeze(1)
    raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


def spatial(tap: torch.Tensor, layouts: set[TapLayout], who: str, path: str) -> torch.Tensor:
    """The tap as a channels-first map, given the layouts of the models it may come from
    (models/tokens.py: a ViT's tokens as the map of its patches, a channels-last map permuted);
    any other tap as it is ((B, C, L) of a model without a token layout too)."""
    if layouts <= {None} or tap.dim() not in (3, 4):
        return tap
    if len(layouts) > 1:
        raise ValueError(f"meal: tap '{path}' of the {who} is laid out differently in different models "
                         f"(token layouts, channels-last maps): {sorted(layouts, key=str)}; tap other modules")
    try:
        return to_map(tap, next(iter(layouts)))
    except ValueError as err:
        raise ValueError(f"meal: tap '{path}' of the {who} gives tokens of shape {tuple(tap.shape)}, but {err}") from None


def positions(tap: torch.Tensor) -> int:
    """The default aligned length of a tap: H·W for a map, D for a vector."""
    return int(tap[0, 0].numel()) if tap.dim() > 2 else int(tap.shape[1])


# --------------------------------------------------------------------------- similarity
def similarity(student: torch.Tensor, target_probs: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """The similarity loss between softmax(student) and target probabilities, both (B, L), T = 1.

    ce: -Σ q log p (batch mean); kl: Σ q (log q - log p) (batch mean); l1: mean |p - q|;
    l2: mean (p - q)² (the means over every element, as torch's l1_loss and mse_loss).
    """
    q = target_probs.float()
    if kind in ("ce", "kl"):
        log_p = F.log_softmax(student.float(), dim=-1)
        per_row = -(q * log_p).sum(-1)
        if kind == "kl":
            per_row = per_row + torch.special.xlogy(q, q).sum(-1)
        return per_row.mean()
    p = F.softmax(student.float(), dim=-1)
    if kind == "l1":
        return (p - q).abs().mean()
    if kind == "l2":
        return (p - q).pow(2).mean()
    raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {kind!r}")


# --------------------------------------------------------------------------- discriminators
class Discriminator(nn.Module):
    """d → d//k → d//k² → 2, ReLU after every layer (the last included, as the authors' code)."""

    def __init__(self, in_features: int, reduction: int = 2):
        super().__init__()
        h1 = max(1, in_features // reduction)
        h2 = max(1, h1 // reduction)
        self.layers = nn.Sequential(nn.Linear(in_features, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                                    nn.Linear(h2, 2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def discriminator_inputs(student: torch.Tensor, teacher: torch.Tensor, layout: str = "separate"):
    """(inputs (2B, d), targets (2B, 2)) for one tap; class 0 is the student, class 1 the teacher.

    separate: the student rows, then the teacher rows. pair: [student, teacher] rows (target
    [1, 0]: the student is first), then [teacher, student] rows (target [0, 1]).
    """
    B = student.shape[0]
    if layout == "separate":
        x = torch.cat([student, teacher])
    elif layout == "pair":
        x = torch.cat([torch.cat([student, teacher], 1), torch.cat([teacher, student], 1)])
    else:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    targets = torch.zeros(2 * B, 2, device=x.device, dtype=x.dtype)
    targets[:B, 0] = 1.0
    targets[B:, 1] = 1.0
    return x, targets


def adversarial_loss(discriminator: nn.Module, student: torch.Tensor, teacher: torch.Tensor,
                     layout: str = "separate", mode: str = "joint") -> torch.Tensor:
    """The discriminator's BCE on one tap's aligned vectors. The discriminator always minimises it;
    the student minimises it too in "joint" mode and maximises it in "minimax" (reversed gradient)."""
    if mode == "minimax":
        student = scale_gradient(student, -1.0)  # the student ascends what the discriminator descends
    elif mode != "joint":
        raise ValueError(f"adversarial mode must be joint or minimax, got {mode!r}")
    x, targets = discriminator_inputs(student, teacher.detach(), layout)
    return F.binary_cross_entropy_with_logits(discriminator(x).float(), targets.float())


def draw_teacher(seed: int, step: int, num_teachers: int) -> int:
    """The teacher of iteration `step`, uniform over the members, a function of (seed, step) alone."""
    return int(np.random.default_rng((int(seed), int(step), 0x4D45414C)).integers(num_teachers))


# --------------------------------------------------------------------------- the method
def _one_of(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"meal option {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _number(name: str, value, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"meal option {name} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _paths(name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not value or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"meal option {name} must be a list of module paths (or 'logits'), got {value!r}")
    return tuple(value)


@register_method("meal")
class MEAL(Method):
    """Block-wise similarity to one teacher per iteration, plus one discriminator per tap.

    Options: similarity (ce | kl | l1 | l2), pool (avg | max), taps and teacher_taps (module
    paths, "logits" for the output; default each model's stage ends plus the logits; as many for
    the student as for the teachers), lengths (L_j; default the teacher taps' positions),
    tap_weights (γ_j), alpha, beta, adversarial (joint | minimax | none), layout (separate |
    pair), disc_lr, disc_reduction (k), teacher_choice (random | combine), teacher_bn (eval |
    train), ce_weight (a hard-label term, 0 by default). Shapes come from `bind(student,
    teachers, example_x)`, which the engine calls once before building the optimizer.
    """

    def __init__(self, similarity: str = "ce", pool: str = "avg", taps=None, teacher_taps=None,
                 lengths: list[int] | None = None, tap_weights: list[float] | None = None,
                 alpha: float = 1.0, beta: float = 1.0, adversarial: str = "joint", layout: str = "separate",
                 disc_lr: float = 1e-3, disc_reduction: int = 2, teacher_choice: str = "random",
                 teacher_bn: str = "eval", ce_weight: float = 0.0):
        super().__init__()
        self.similarity = _one_of("similarity", similarity, SIMILARITIES)
        self.pool = _one_of("pool", pool, POOLS)
        self.adversarial = _one_of("adversarial", adversarial, ADVERSARIAL)
        self.layout = _one_of("layout", layout, LAYOUTS)
        self.teacher_choice = _one_of("teacher_choice", teacher_choice, CHOICES)
        self.teacher_bn = _one_of("teacher_bn", teacher_bn, TEACHER_BN)
        self.alpha, self.beta = _number("alpha", alpha), _number("beta", beta)
        self.ce_weight = _number("ce_weight", ce_weight)
        self.disc_lr = _number("disc_lr", disc_lr)
        if isinstance(disc_reduction, bool) or not isinstance(disc_reduction, int) or disc_reduction < 1:
            raise ValueError(f"meal option disc_reduction must be an integer >= 1, got {disc_reduction!r}")
        self.disc_reduction = disc_reduction
        self.student_taps, self.teacher_taps = _paths("taps", taps), _paths("teacher_taps", teacher_taps)
        if lengths is not None and (not lengths or not all(isinstance(n, int) and not isinstance(n, bool)
                                                            and n >= 1 for n in lengths)):
            raise ValueError(f"meal option lengths must be a list of positive integers, got {lengths!r}")
        if tap_weights is not None and (not tap_weights or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in tap_weights)):
            raise ValueError(f"meal option tap_weights must be a list of numbers >= 0, got {tap_weights!r}")
        self.lengths = list(lengths) if lengths is not None else None
        self.tap_weights = [float(w) for w in tap_weights] if tap_weights is not None else None
        self.discriminators = nn.ModuleList()
        # Per tap path, the layouts of the models it comes from (models/tokens.py), read at bind.
        self.student_layouts: dict[str, set[TapLayout]] = {}
        self.teacher_layouts: dict[str, set[TapLayout]] = {}
        self._set_needs()

    # ------------------------------------------------------------------ setup
    def _set_needs(self) -> None:
        def inner(paths):  # None: the model's stage ends, resolved at bind
            return (STAGE_TAPS,) if paths is None else tuple(p for p in paths if p != LOGITS)
        teacher = self.teacher_taps if self.teacher_taps is not None else self.student_taps
        self.needs = Needs(teacher_logits=True, teacher_taps=inner(teacher),
                           student_taps=inner(self.student_taps), teacher_bn=self.teacher_bn)

    def bind(self, student: nn.Module, teachers=None, example_x: torch.Tensor | None = None) -> None:
        """Resolve the taps, their lengths and weights, and build the discriminators."""
        if teachers is None:
            raise ValueError("meal needs teachers")
        members = getattr(teachers, "members", None)
        if members is None and isinstance(teachers, (list, tuple, nn.ModuleList)):
            members = list(teachers)
        if self.teacher_taps is None:  # the student's paths when given, else the first teacher's stages
            self.teacher_taps = self.student_taps or (
                (LOGITS,) if members is None else _default_taps(members[0], "first teacher", "teacher_taps"))
        self.student_taps = self.student_taps or _default_taps(student, "student", "taps")
        n = len(self.student_taps)
        if len(self.teacher_taps) != n:
            raise ValueError(f"meal needs as many student taps as teacher taps, got {n} "
                             f"({', '.join(self.student_taps)}) and {len(self.teacher_taps)} "
                             f"({', '.join(self.teacher_taps)}); set the options taps and teacher_taps")
        if members is None and any(p != LOGITS for p in self.teacher_taps):
            raise ValueError("meal with taps other than 'logits' needs the teachers' intermediate outputs, "
                             "which a teacher cache does not hold; unset teachers.cache, or set taps: [logits]")
        for path in self.student_taps:
            if path != LOGITS:
                resolve_module(student, path)
        for i, member in enumerate(members or ()):
            for path in self.teacher_taps:
                if path != LOGITS:
                    try:
                        resolve_module(member, path)
                    except ValueError as err:
                        raise ValueError(f"meal: teacher {i} has no module '{path}'; every teacher needs the "
                                         f"teacher_taps ({err})") from None
        self.student_layouts = {p: {tap_layout(student, p)} for p in self.student_taps}
        self.teacher_layouts = {p: {tap_layout(m, p) for m in members or ()} or {None} for p in self.teacher_taps}
        if self.lengths is None:
            self.lengths = self._default_lengths(members, teachers, example_x)
        if len(self.lengths) != n:
            raise ValueError(f"meal option lengths has {len(self.lengths)} entries for {n} taps")
        if self.tap_weights is None:
            if n not in TAP_WEIGHTS:
                raise ValueError(f"meal has no default tap_weights for {n} taps; set the option tap_weights")
            self.tap_weights = list(TAP_WEIGHTS[n])
        if len(self.tap_weights) != n:
            raise ValueError(f"meal option tap_weights has {len(self.tap_weights)} entries for {n} taps")
        if self.adversarial != "none":
            width = 2 if self.layout == "pair" else 1
            built = [d.layers[0].in_features for d in self.discriminators]
            wanted = [width * n for n in self.lengths]
            if built != wanted:
                self.discriminators = nn.ModuleList(Discriminator(d, self.disc_reduction) for d in wanted)
            device = next((p.device for p in student.parameters()), None)
            if device is not None:
                self.discriminators.to(device)
        self._set_needs()

    def _default_lengths(self, members, teachers, example_x) -> list[int]:
        if members is None or example_x is None:
            if all(p == LOGITS for p in self.teacher_taps) and getattr(teachers, "num_classes", None):
                return [int(teachers.num_classes)] * len(self.teacher_taps)
            raise ValueError("meal cannot tell the taps' lengths: pass example_x to bind(), or the option lengths")
        model = unwrap(getattr(members[0], "_orig_mod", members[0]))
        inner = [p for p in self.teacher_taps if p != LOGITS]
        with torch.no_grad():
            logits, taps = forward_with_taps(model, example_x[:2].to(next(model.parameters()).device), inner)
        return [positions(logits if p == LOGITS else spatial(taps[p], self.teacher_layouts[p], "teachers", p))
                for p in self.teacher_taps]

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.discriminators.parameters()), "lr": self.disc_lr, "name": "discriminators"}]

    def teacher_indices(self, step: int, num_teachers: int, seed: int) -> list[int] | None:
        if self.teacher_choice == "combine":
            return None
        return [draw_teacher(seed, step, num_teachers)]

    # ------------------------------------------------------------------ loss
    def loss(self, batch, student, teachers) -> MethodLoss:
        if self.lengths is None or self.tap_weights is None:
            raise ValueError("meal is not bound yet: call method.bind(student, teachers, example_x) before "
                             "training (the engine does)")
        z_t = teacher_logits_of(teachers, "meal")  # (m, B, K): the drawn teacher, or all to combine
        sim_total, gan_total = 0.0, 0.0
        logs = {}
        for j, (s_path, t_path) in enumerate(zip(self.student_taps, self.teacher_taps)):
            s_tap = student.logits if s_path == LOGITS else spatial(
                student.taps[s_path], self.student_layouts.get(s_path, {None}), "student", s_path)
            t_taps = list(z_t) if t_path == LOGITS else [
                spatial(t, self.teacher_layouts.get(t_path, {None}), "teachers", t_path) for t in teachers.taps[t_path]]
            a_s = align(s_tap, self.lengths[j], self.pool)
            a_t = torch.stack([align(t, self.lengths[j], self.pool) for t in t_taps])  # (m, B, L)
            sim = similarity(a_s, F.softmax(a_t, dim=-1).mean(0), self.similarity)
            sim_total = sim_total + self.tap_weights[j] * sim
            logs[f"sim_{j}"] = sim.detach()
            if self.adversarial != "none":
                gan = adversarial_loss(self.discriminators[j], a_s, a_t.mean(0), self.layout, self.adversarial)
                gan_total = gan_total + gan
                logs[f"gan_{j}"] = gan.detach()
        loss = self.alpha * sim_total
        logs["sim"] = sim_total.detach()
        if self.adversarial != "none":
            loss = loss + self.beta * gan_total
            logs["gan"] = gan_total.detach()
        if self.ce_weight:
            ce = F.cross_entropy(student.logits.float(), class_targets(batch))
            loss = loss + self.ce_weight * ce
            logs["ce"] = ce.detach()
        logs["loss"] = loss.detach()
        return MethodLoss(loss, logs)


def _default_taps(model: nn.Module, who: str, option: str) -> tuple[str, ...]:
    """The model's stage ends and the logits, at most 5 taps (the paper's longest γ list): a deeper model
    keeps its first 4 stage ends, as the authors' VGG, whose 5th pooled output the logits replace."""
    try:
        taps = default_taps(model)
    except ValueError:
        raise ValueError(f"meal: the {who} has no tap_points; set the option '{option}' to module paths "
                         f"(or [logits])") from None
    most = max(TAP_WEIGHTS)
    return taps if len(taps) <= most else (*taps[:most - 1], LOGITS)
