"""LatentBE (Nam et al., ICML 2022): distil M teachers one-to-one into a BatchEnsemble, then
average its weights into one plain network.

The student is `create("batchensemble", base=<student.arch>, members=M)`: every conv and linear
layer shares its weight W and gives member i input and output factors r_i, s_i (BatchNorm
shared). Member i learns from teacher i alone:

    L = mean_i [(1-α)·CE(y, z_s,i) + α·T²·KL(p_t,i || p_s,i)]   (α = 1, T = 4)

plus, from the authors' code, a pull of the factors towards 1, factor_decay·Σ ½||1 - f||²/M
(the optimizer's own weight decay leaves them alone), and their gradients multiplied by M.
`collapse(model)` folds the members into one network of the base architecture, W' = W ∘ (s̄ r̄ᵀ):
one forward pass, and (the point of the paper) most of the ensemble's calibration.
Input perturbations (perturb.kind: ods, confods, tdiv_sdiv) are an engine feature that works with
this method; TDiv−SDiv pairs student member i with teacher i.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from ..models import unwrap
from ..models.batchensemble import MEMBERS_TAP, BatchEnsembleNet, collapse
from .base import Method, MethodLoss, Needs, register_method, class_targets
from .kd import check_fraction, check_temperature, teacher_kd_losses, teacher_logits_of

__all__ = ["LatentBE", "collapse"]


@register_method("latentbe")
class LatentBE(Method):
    """One-to-one KD into a BatchEnsemble student; evaluate it whole and collapsed.

    Options: alpha (1), temperature (4), members (default: the number of teachers), init (ones |
    normal | sign), bias (shared | member), factor_decay (5e-4; 0 turns it off), scale_factor_grads
    (true: the factors' gradients times M), collapse (product_of_means | mean_of_products),
    recalibrate_bn (0: the collapsed network keeps the BE's BatchNorm statistics, as the authors'
    code; k: re-estimated over the first k batches of training views, see deployable).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 4.0, members: int | None = None,
                 init: str = "ones", bias: str = "shared", factor_decay: float = 5e-4,
                 scale_factor_grads: bool = True, collapse: str = "product_of_means", recalibrate_bn: int = 0):
        super().__init__()
        self.alpha, self.temperature = check_fraction("alpha", alpha), check_temperature(temperature)
        if members is not None and (isinstance(members, bool) or not isinstance(members, int) or members < 1):
            raise ValueError(f"latentbe option members must be a positive integer, got {members!r}")
        if isinstance(factor_decay, bool) or not isinstance(factor_decay, (int, float)) or factor_decay < 0:
            raise ValueError(f"latentbe option factor_decay must be a number >= 0, got {factor_decay!r}")
        if collapse not in ("product_of_means", "mean_of_products"):
            raise ValueError(f"latentbe option collapse must be product_of_means or mean_of_products, got {collapse!r}")
        self.members, self.init, self.bias = members, init, bias
        self.factor_decay, self.scale_factor_grads = float(factor_decay), bool(scale_factor_grads)
        self.collapse_mode = collapse
        if isinstance(recalibrate_bn, bool) or not isinstance(recalibrate_bn, int) or recalibrate_bn < 0:
            raise ValueError(f"latentbe option recalibrate_bn must be a number of batches >= 0, got {recalibrate_bn!r}")
        self.recalibrate_bn = recalibrate_bn
        self.needs = Needs(teacher_logits=True, student_taps=(MEMBERS_TAP,))
        self._factors: list[torch.nn.Parameter] = []
        self._hooks: list = []

    def student_spec(self, arch: str, kwargs: dict, num_teachers: int | None = None) -> tuple[str, dict]:
        if arch == "batchensemble":
            return arch, kwargs
        members = self.members or num_teachers
        if members is None:
            raise ValueError("latentbe needs the number of members: set the option members (one per teacher)")
        return "batchensemble", {"base": arch, "base_kwargs": dict(kwargs), "members": members,
                                 "init": self.init, "bias": self.bias}

    def bind(self, student, teachers=None, example_x=None) -> None:
        net = unwrap(student)
        if not isinstance(net, BatchEnsembleNet):
            raise ValueError(f"latentbe trains a BatchEnsemble student, got {type(net).__name__}; build it with "
                             f"create('batchensemble', base=..., members=M) (the distill command does)")
        if teachers is not None and len(teachers) != net.members:
            raise ValueError(f"latentbe pairs members with teachers one to one: {net.members} members, "
                             f"{len(teachers)} teachers; set the option members to {len(teachers)}")
        for handle in self._hooks:
            handle.remove()
        self._factors = list(net.factor_parameters())
        M = net.members
        self._hooks = [p.register_hook(lambda g, M=M: g * M) for p in self._factors] if self.scale_factor_grads else []

    def loss(self, batch, student, teachers) -> MethodLoss:
        if MEMBERS_TAP not in student.taps:
            raise ValueError(f"latentbe needs the student's '{MEMBERS_TAP}' tap: the (M, B, K) member logits")
        z_s = student.taps[MEMBERS_TAP]
        z_t = teacher_logits_of(teachers, "latentbe")
        if z_t.shape != z_s.shape:
            raise ValueError(f"latentbe pairs members with teachers: student logits {tuple(z_s.shape)}, "
                             f"teacher logits {tuple(z_t.shape)}")
        kd = teacher_kd_losses(z_s, z_t, self.temperature).mean()  # member i with teacher i
        targets = class_targets(batch)
        ce = F.cross_entropy(z_s.float().flatten(0, 1), targets.repeat(z_s.shape[0], *[1] * (targets.dim() - 1)))
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        logs = {"ce": ce.detach(), "kd": kd.detach()}
        if self.factor_decay and self._factors:
            M = z_s.shape[0]
            pull = sum(0.5 * (1.0 - f).pow(2).sum() for f in self._factors) / M
            loss = loss + self.factor_decay * pull
            logs["factor_pull"] = pull.detach()
        logs["loss"] = loss.detach()
        return MethodLoss(loss, logs)

    def deployable(self, model, inputs=None):
        """The network to ship: the BatchEnsemble collapsed into the base architecture.

        Its BatchNorm statistics are the BE's, gathered over all members' activations; when the
        factors have spread (a BN after every conv, as in timm/torchvision ResNets, far from the
        factors' 1), those no longer describe the collapsed network's activations. recalibrate_bn=k
        re-estimates them over k batches of `inputs` (torch.optim.swa_utils.update_bn, a cumulative
        average), as SWA does after averaging weights."""
        shipped = collapse(unwrap(model), self.collapse_mode)
        if self.recalibrate_bn and inputs is not None:
            device = next(shipped.parameters()).device
            with torch.no_grad():
                update_bn(itertools.islice(inputs, self.recalibrate_bn), shipped, device=device)  # keeps the mode
        return shipped
