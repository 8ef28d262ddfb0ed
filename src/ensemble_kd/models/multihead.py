"""Multi-headed networks (EnsembleNet): shared lower stages, N branches of the upper stages.

    net = create("multihead", base="resnet20", branches=2, fork="layer3")

Any model that keeps the stage contract (models/stages.py) can be the base, and any timm or
torchvision ResNet/ResNeXt (`timm/resnet50`, `torchvision/resnet50`: models/library_resnets.py) or
timm ConvNeXt (`timm/convnext_tiny`: models/library_convnext.py): the
stem and the stages before `fork` are built once and shared; the stages from `fork` on and the
head are built N times, as branches, at the base's widths divided by `width_factor` and with
`branch_kwargs` over the base's keyword arguments (e.g. {num_experts: 3} for a DBoF whose base has
5, as the paper shrinks MoE-5 to MoE-3). By default the factor is the smallest (on a 0.05 grid)
that keeps the whole network no larger than the base (about 1.4 for two branches, as the paper's ≈1.5).
`branch_widths` instead names the branched stages' widths outright, in the base's width config (the
paper's tables): a bottleneck ResNet's planes, so the paper's ResNet-152 with two branches of
(176, 352) from layer3 is

    create("multihead", base="timm/resnet152", num_classes=1000, fork="layer3", branch_widths=[176, 352])

forward(x) is the ensembler's prediction from one pass, as logits: log p_ens for a
classifier (softmax gives p_ens back), logit(p_ens) for a multi-label model (sigmoid does).
The branch logits (N, B, K) pass through the identity module `heads` and the gate's weights
(B, N) come out of `ensembler`, so a method reads both as taps. Ensemblers: "mean" (the
average of the branch probabilities) and "gate" (ONE's gate: the shared features, pooled,
through linear -> BN -> ReLU -> softmax over the branches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import create, register_model
from . import library_convnext, library_resnets
from .stages import forward_head, forward_stem, has_stages, run_stages

ENSEMBLERS = ("mean", "gate")
_EPS = 1e-6


class Gate(nn.Module):
    """Weights over the branches from the shared features: pool -> linear -> BN -> ReLU -> softmax."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = h.flatten(2).mean(-1) if h.dim() > 2 else h
        return F.softmax(F.relu(self.bn(self.fc(pooled))), dim=-1)


def mix_log(log_x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """log Σ_i w_i x_i from (N, B, K) log x_i: the mean (w_i = 1/N) or (B, N) weights; (B, K)."""
    N = log_x.shape[0]
    log_w = (torch.full(log_x.shape[:2], -math.log(N), device=log_x.device) if weights is None
             else weights.float().clamp_min(1e-30).log().T)[..., None]  # (N, B, 1)
    return torch.logsumexp(log_x + log_w, 0)


def ensemble_logits(branch_logits: torch.Tensor, weights: torch.Tensor | None = None,
                    multilabel: bool = False) -> torch.Tensor:
    """(N, B, K) branch logits -> (B, K) logits of the mixture of their probabilities (mean, or
    weighted by (B, N) weights): log p_ens (softmax), or logit(p_ens) (sigmoid, multi-label)."""
    z = branch_logits.float()
    if not multilabel:
        return mix_log(F.log_softmax(z, -1), weights)
    p = mix_log(F.logsigmoid(z), weights).exp().clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


class MultiHeadNet(nn.Module):
    def __init__(self, base: str, num_classes: int = 10, in_channels: int = 3, branches: int = 2,
                 fork: str | None = None, width_factor: float | None = None, ensembler: str = "mean",
                 base_kwargs: dict | None = None, branch_kwargs: dict | None = None, pretrained: bool = False,
                 branch_widths: list[int] | None = None):
        super().__init__()
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise ValueError(f"multihead branches must be a positive integer, got {branches!r}.")
        if ensembler not in ENSEMBLERS:
            raise ValueError(f"multihead ensembler must be one of {', '.join(ENSEMBLERS)}, got {ensembler!r}.")
        kwargs = dict(base_kwargs or {})
        # pretrained: the library's weights in the shared stem and stages; the narrower branches start fresh
        trunk = create(base, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained, **kwargs)
        self.base_spec: dict = dict(trunk.spec)  # create(**base_spec) builds the plain base network
        library = expose_library_stages(trunk)
        if not has_stages(trunk):
            raise ValueError(f"model {base!r} does not expose its stages (stem_points, tap_points, head_points, "
                             f"stage_channels); the multi-head builder needs them (timm and torchvision ResNets "
                             f"have them, and timm's ConvNeXt).")
        points = list(trunk.tap_points)
        fork = fork or points[-1]
        if fork not in points:
            raise ValueError(f"multihead fork must be one of {base}'s stages {points}, got {fork!r}.")
        at = points.index(fork)
        if ensembler == "gate" and at == 0:
            raise ValueError("the gate ensembler reads the shared stages' output; fork after the first stage.")
        base_widths = list(trunk.stage_channels)
        branch_kwargs = dict(branch_kwargs or {})
        if branch_kwargs and library:
            raise ValueError(f"multihead branch_kwargs apply to this package's models, not to {base!r}")
        if "widths" in branch_kwargs:
            raise ValueError("multihead branch_kwargs cannot set widths: set branch_widths (or width_factor)")
        if branch_widths is not None:
            if width_factor is not None:
                raise ValueError("multihead takes branch_widths or width_factor, not both; drop one of them")
            widths = explicit_widths(trunk, at, branch_widths)
        elif width_factor is None:
            gate = (base_widths[at - 1] + 3) * branches if ensembler == "gate" else 0  # linear + BN
            width_factor = fitting_width_factor(base, num_classes, in_channels, branches, at, kwargs, extra=gate,
                                                branch_kwargs=branch_kwargs)
        if branch_widths is None:
            if isinstance(width_factor, bool) or not isinstance(width_factor, (int, float)) or not width_factor > 0:
                raise ValueError(f"multihead width_factor must be a positive number, got {width_factor!r}.")
            widths = narrowed_widths(base_widths, at, width_factor)
        kwargs.pop("widths", None)
        self.base = base
        # with explicit widths: the first branched stage's base width over its branch width
        self.width_factor = float(width_factor) if width_factor is not None else base_widths[at] / widths[at]
        self.shared_points, self.branch_points = tuple(points[:at]), tuple(points[at:])
        self.multilabel = bool(getattr(trunk, "multilabel", False))
        members = [_member(trunk if library else None, base, num_classes, in_channels,
                           {**kwargs, **branch_kwargs}, widths, at) for _ in range(branches)]
        self.branch_widths = tuple(members[0].stage_channels)  # a bottleneck's: planes·4, so rounded
        _drop(trunk, (*self.branch_points, *trunk.head_points))
        for member in members:
            _drop(member, (*member.stem_points, *self.shared_points))
        self.trunk = trunk
        self.branches = nn.ModuleList(members)
        self.heads = nn.Identity()  # its output is the (N, B, K) branch logits: a tap for the method
        self.ensembler = Gate(base_widths[at - 1], branches) if ensembler == "gate" else None

    def plain_base(self) -> nn.Module:
        """The base network on the meta device (shapes only): what a base's weights file must fit."""
        with torch.device("meta"):
            return create(**self.base_spec)

    @torch.no_grad()
    def load_base_state(self, state: dict[str, torch.Tensor]) -> None:
        """A base network's weights (a file fitting `plain_base()`) into the shared stem and stages, as
        `pretrained: true` puts the library's there; the narrower branches and the gate keep their
        initialisation."""
        own = self.trunk.state_dict()  # the base's keys minus the branches' stages and the head
        self.trunk.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}}, strict=True)

    def forward_branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, B, K) branch logits and the gate's (B, N) weights (None for the mean)."""
        h = run_stages(self.trunk, forward_stem(self.trunk, x), self.shared_points)
        z = torch.stack([forward_head(b, run_stages(b, h, self.branch_points)) for b in self.branches])
        return self.heads(z), (self.ensembler(h) if self.ensembler is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, weights = self.forward_branches(x)
        return ensemble_logits(z, weights, self.multilabel)


def narrowed_widths(widths, at: int, factor: float) -> list[int]:
    """The base's stage widths, those from stage `at` on divided by `factor` (at least 1)."""
    return list(widths[:at]) + [max(1, round(w / factor)) for w in widths[at:]]


def explicit_widths(trunk: nn.Module, at: int, branch_widths) -> list[int]:
    """The stage widths of a member whose stages `at`.. have `branch_widths`, given in the base's width
    config: a stage's output channels are its config width times the model's `width_unit` (a
    bottleneck ResNet's expansion, 4: the paper's width config counts the bottleneck's planes)."""
    points = list(trunk.tap_points)
    upper = points[at:]
    if (not isinstance(branch_widths, (list, tuple)) or len(branch_widths) != len(upper)
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in branch_widths)):
        raise ValueError(f"multihead branch_widths must be {len(upper)} positive integers, one per branched stage "
                         f"{upper} (fork {points[at]!r}), got {branch_widths!r}.")
    unit = getattr(trunk, "width_unit", 1)
    return list(trunk.stage_channels[:at]) + [w * unit for w in branch_widths]


# Library networks given the stage contract, each: expose_stages(model) -> bool (the names set in
# place) and at_widths(model, ...) -> the network rebuilt narrower from stage `at` on (None: not its).
LIBRARY_FAMILIES = (library_resnets, library_convnext)


def expose_library_stages(model: nn.Module) -> bool:
    return any(family.expose_stages(model) for family in LIBRARY_FAMILIES)


def _member(library_base: nn.Module | None, base: str, num_classes: int, in_channels: int, kwargs: dict,
            widths, at: int) -> nn.Module:
    """`base` with stages `at`.. at `widths`: our models through their `widths` argument, a library
    network (given as `library_base`, the base built) rebuilt by its family's at_widths."""
    if library_base is not None:
        for family in LIBRARY_FAMILIES:
            member = family.at_widths(library_base, base, num_classes, in_channels, kwargs, widths, at)
            if member is not None:
                return member
        raise ValueError(f"model {base!r} cannot be rebuilt at other widths")
    return create(base, num_classes=num_classes, in_channels=in_channels, widths=widths, **kwargs)


def fitting_width_factor(base: str, num_classes: int, in_channels: int, branches: int, at: int,
                         kwargs: dict, extra: int = 0, branch_kwargs: dict | None = None) -> float:
    """The smallest factor on a 0.05 grid for which N branches, the shared part and `extra`
    parameters (the gate's) are no more than the base network's (counted on the meta device)."""
    with torch.device("meta"):
        reference = create(base, num_classes=num_classes, in_channels=in_channels, **kwargs)
        library = expose_library_stages(reference)
        budget = _count(reference)
        widths = list(reference.stage_channels)
        rest = {**{k: v for k, v in kwargs.items() if k != "widths"}, **(branch_kwargs or {})}
        head_and_upper = sum(_count(reference.get_submodule(n)) for n in (*reference.tap_points[at:],
                                                                         *reference.head_points))
        shared = budget - head_and_upper
        for step in range(0, 20 * (branches + 1)):
            factor = 1.0 + 0.05 * step
            member = _member(reference if library else None, base, num_classes, in_channels, rest,
                             narrowed_widths(widths, at, factor), at)
            per_branch = sum(_count(member.get_submodule(n)) for n in (*member.tap_points[at:], *member.head_points))
            if shared + branches * per_branch + extra <= budget:
                return round(factor, 2)
    raise ValueError(f"no width factor keeps {branches} branches of {base} within the base's parameters; "
                     f"set width_factor")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _drop(model: nn.Module, names) -> None:
    """Remove the named submodules (they live in another part of the multi-headed net): a direct
    one is deleted, one inside a container (ConvNeXt's `stages.3`) becomes an Identity, so the
    container's other entries keep their names (and their state_dict keys)."""
    for name in names:
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if child not in parent._modules:
            continue
        if parent is model:
            delattr(model, child)
        else:
            parent._modules[child] = nn.Identity()


@register_model("multihead")
def multihead(num_classes: int = 10, in_channels: int = 3, base: str = "small_cnn", branches: int = 2,
              fork: str | None = None, width_factor: float | None = None, ensembler: str = "mean",
              base_kwargs: dict | None = None, branch_kwargs: dict | None = None,
              pretrained: bool = False, branch_widths: list[int] | None = None) -> MultiHeadNet:
    """EnsembleNet's multi-headed version of `base` (any model with stages): N branches from `fork`."""
    return MultiHeadNet(base, num_classes, in_channels, branches, fork, width_factor, ensembler, base_kwargs,
                        branch_kwargs, pretrained, branch_widths)
