"""The teacher set: M frozen networks, any mix of architectures, one interface.

Built from plain nn.Modules, from checkpoints, or from the manifest a
`train-teachers` run writes. Members always run in eval mode without gradients.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..methods import Needs, TeacherOutput
from ..methods.base import STAGE_TAPS
from ..engine.checkpoint import read_json
from ..models import forward_with_taps
from ..precision import autocast_dtype

MANIFEST = "manifest.json"


class TeacherSet(nn.Module):
    def __init__(self, members: Sequence[nn.Module], names: Sequence[str] | None = None,
                 data_records: Sequence[dict | None] | None = None):
        super().__init__()
        if not members:
            raise ValueError("a teacher set needs at least one member")
        self.members = nn.ModuleList(members)
        self.names = list(names) if names is not None else [f"teacher{i}" for i in range(len(members))]
        if len(self.names) != len(self.members):
            raise ValueError(f"{len(self.members)} teachers but {len(self.names)} names")
        # The data each member was trained on (data.dataset_record; None: not recorded).
        self.data_records = list(data_records) if data_records is not None else [None] * len(self.members)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.precision: torch.dtype | None = None  # autocast dtype for inference, None: fp32
        self.channels_last = False
        self.folded = False  # BatchNorm folded into the convolutions (prepare_for_inference)

    def train(self, mode: bool = True) -> TeacherSet:
        return super().train(False)  # teachers stay frozen in eval mode

    def __len__(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], names=None, device="cpu") -> TeacherSet:
        from ..engine.checkpoint import load_model, model_data

        models = [load_model(p, map_location=device) for p in paths]
        return cls(models, names or [Path(p).parent.name or Path(p).stem for p in paths],
                   [model_data(p) for p in paths])

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu", take: int | None = None) -> TeacherSet:
        """Members listed in a train-teachers run's manifest.json (the first `take` of them if given).

        A run whose manifest lists fewer members than it planned (a killed run) is refused; a manifest
        from before `complete` was recorded counts as complete, every member it lists being loaded."""
        run_dir = Path(run_dir)
        path = run_dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"'{run_dir}' has no {MANIFEST}: is it a finished train-teachers run?")
        manifest = read_json(path, "train the teachers again (ensemble-kd train-teachers ... --overwrite)",
                             keys=("members",))
        members = manifest["members"]
        missing = [n for n in manifest.get("planned", []) if n not in {m["name"] for m in members}]
        if missing or manifest.get("complete") is False:
            raise ValueError(f"'{run_dir}' is an unfinished train-teachers run ({len(members)} of "
                             f"{len(manifest.get('planned', members))} members; missing: {', '.join(missing)}); "
                             f"finish it with `{_resume_command(run_dir)}`")
        if take is not None:
            if take > len(members):
                raise ValueError(f"teachers.take={take} but '{run_dir}' has {len(members)} members")
            members = members[:take]
        return cls.from_checkpoints([run_dir / m["checkpoint"] for m in members],
                                    [m["name"] for m in members], device=device)

    # ------------------------------------------------------------------ speed
    def prepare_for_inference(self, *, precision: str = "auto", channels_last: bool | None = None,
                              fold_bn: bool = True, compile: bool = False) -> TeacherSet:
        """Fast frozen teachers: BatchNorm folded, bf16 autocast and channels_last on GPUs, compiled.

        precision: auto (bf16 on GPUs with native bf16, fp16 on older ones, fp32 elsewhere), bf16,
        fp16 or fp32. Folding keeps module paths, so taps still address the same stages.
        """
        device = next(self.parameters()).device
        self.precision = autocast_dtype(precision, device)
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        # The weights as trained (folding rewrites them): what a cache fingerprint must name.
        # Kept on the CPU: only their bytes are read, and the GPU holds the fast copies.
        self.source_members = getattr(self, "source_members", None) or [copy.deepcopy(m).cpu() for m in self.members]
        self.folded = fold_bn
        for i, member in enumerate(self.members):
            # copies: the modules the set was built from are left as they were
            member = fold_batchnorm(member) if fold_bn else copy.deepcopy(member)
            if self.channels_last:
                member = member.to(memory_format=torch.channels_last)
            if compile:
                member = torch.compile(member)
            self.members[i] = member
        return self

    def _inference(self, x: torch.Tensor):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision is None:
            return x, contextlib.nullcontext()
        return x, torch.autocast(x.device.type, dtype=self.precision)

    # ------------------------------------------------------------------ predicting
    @property
    def num_classes(self) -> int:
        counts = {getattr(m, "spec", {}).get("num_classes") for m in self.members}
        counts.discard(None)
        if len(counts) > 1:
            raise ValueError(f"the teachers disagree on the number of classes: {sorted(counts)}")
        return counts.pop() if counts else None

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, K) float32 logits."""
        x, autocast = self._inference(x)
        with autocast:
            return torch.stack([m(x).float() for m in self.members])

    def member_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i's float32 logits, gradients flowing to `x` (input perturbations need them);
        the weights stay frozen."""
        x, autocast = self._inference(x)
        with autocast:
            return self.members[i](x).float()

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).softmax(-1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's prediction: the mean of member probabilities (not logits)."""
        return self.member_probs(x).mean(0)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, needs: Needs, *, index=None, epoch=None, members=None) -> TeacherOutput:
        """What a method declared it needs, computed once per member.

        `index` and `epoch` name the view; online teachers ignore them, a cache reads by them.
        `members` (indices) runs only those teachers, in that order; None runs all.
        """
        if STAGE_TAPS in needs.teacher_taps:
            raise ValueError("the method's taps are named when it is bound: call method.bind(student, teachers, "
                             "example_x) before asking for teacher outputs (the engine does)")
        logits, taps = [], {name: [] for name in needs.teacher_taps}
        x, autocast = self._inference(x)
        chosen = self.members if members is None else [self.members[i] for i in members]
        with autocast:
            for m in chosen:
                with self._normalisation(m, needs.teacher_bn):
                    if needs.teacher_taps:
                        out, got = self._tapped_forward(m, tuple(needs.teacher_taps))(x)
                        for name in needs.teacher_taps:
                            taps[name].append(got[name].float())
                    else:
                        out = m(x)
                logits.append(out.float())
        return TeacherOutput(torch.stack(logits) if needs.teacher_logits else None, taps)

    def _tapped_forward(self, member: nn.Module, paths: tuple[str, ...]):
        """member(x) and the outputs at `paths`; a compiled member's taps compiled too (dynamo traces
        the hooks into the graph), one compiled function per member and set of paths."""
        eager = getattr(member, "_orig_mod", member)
        if eager is member:
            return functools.partial(forward_with_taps, member, paths=paths)
        tapped = self.__dict__.setdefault("_compiled_taps", {})
        key = (id(eager), paths)
        if key not in tapped:
            tapped[key] = torch.compile(functools.partial(forward_with_taps, eager, paths=paths))
        return tapped[key]

    def _normalisation(self, member: nn.Module, mode: str):
        if mode == "eval":
            return contextlib.nullcontext()
        if mode != "train":
            raise ValueError(f"teacher_bn must be 'eval' or 'train', got {mode!r}")
        if self.folded:
            raise ValueError("teacher_bn=train needs the teachers' BatchNorm layers, and they were folded "
                             "into the convolutions; set teachers.fold_bn=false")
        return batch_statistics(getattr(member, "_orig_mod", member))


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """BatchNorm layers normalise with each batch's own statistics and leave their running ones alone
    (train mode without tracking: no running mean, variance or batch count is updated)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, track) in zip(norms, saved):
            m.training, m.track_running_stats = training, track


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every BatchNorm2d that directly follows a Conv2d folded into that conv.

    Which BN follows which conv is read off a torch.fx trace (data flow, not attribute
    order); a model fx cannot trace falls back to adjacent pairs inside nn.Sequential.
    The BN becomes an Identity in place, so module paths (and taps) are unchanged; timm's
    BatchNormAct2d (BN, dropout, activation in one module: its EfficientNets, MobileNetV3s,
    `*ts` ResNets) becomes its dropout and activation. A conv or BN with a forward of its own
    (weight standardisation, an unknown BN subclass) is left as it is.
    """
    model = copy.deepcopy(model).eval()
    for conv_path, bn_path in _conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        after = _after_fold(bn)
        if after is not None and _plain_conv(conv) and bn.track_running_stats and conv.weight.shape[0] == bn.num_features:
            _set_submodule(model, conv_path, fuse_conv_bn_eval(conv, bn))
            _set_submodule(model, bn_path, after)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


BN_ACT = "timm.layers.norm_act.BatchNormAct2d"  # forward: batch_norm, then self.drop, then self.act


def _after_fold(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of `bn` once its affine map is in the conv; None: not safe to fold."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if f"{type(bn).__module__}.{type(bn).__qualname__}" == BN_ACT:
        return nn.Sequential(bn.drop, bn.act)
    return None


def _plain_conv(conv: nn.Module) -> bool:
    """A conv whose forward uses its weight as it is (fusing into a standardised weight would not)."""
    return type(conv).forward is nn.Conv2d.forward and type(conv)._conv_forward is nn.Conv2d._conv_forward


class _BatchNormLeaves(torch.fx.Tracer):
    """Keep every BatchNorm2d (timm's BatchNormAct2d too) one module call in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    try:
        graph = _BatchNormLeaves().trace(model)
    except Exception:  # untraceable control flow: only Sequential adjacency is safe to trust
        return [(f"{p}.{a}" if p else a, f"{p}.{b}" if p else b)
                for p, parent in model.named_modules() if isinstance(parent, nn.Sequential)
                for a, b in zip(list(parent._modules), list(parent._modules)[1:])
                if isinstance(parent._modules[a], nn.Conv2d) and isinstance(parent._modules[b], nn.BatchNorm2d)]
    pairs, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (getattr(src, "op", None) == "call_module" and len(src.users) == 1
                and isinstance(model.get_submodule(src.target), nn.Conv2d) and src.target not in seen):
            pairs.append((src.target, node.target))
            seen.add(src.target)
    # a module called twice would appear twice; fold only pairs used exactly once
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    return [(c, b) for c, b in pairs if calls.count(c) == 1 and calls.count(b) == 1]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def majority_vote(member_probs: torch.Tensor) -> torch.Tensor:
    """(M, B, K) -> (B,) class with most votes; ties go to the highest mean probability."""
    num_classes = member_probs.shape[-1]
    votes = nn.functional.one_hot(member_probs.argmax(-1), num_classes).sum(0).float()
    return (votes + 1e-3 * member_probs.mean(0)).argmax(-1)


def write_manifest(run_dir: Path, members: list[dict], planned: Sequence[str] | None = None) -> None:
    """The members trained so far; `planned` names every member the run will have (default: these),
    and `complete` says whether all of them are in."""
    from ..engine.checkpoint import atomic_write_text

    planned = [m["name"] for m in members] if planned is None else list(planned)
    complete = set(planned) <= {m["name"] for m in members}
    atomic_write_text(run_dir / MANIFEST, json.dumps({"complete": complete, "planned": planned,
                                                      "members": members}, indent=2))


def _resume_command(run_dir: Path) -> str:
    """How to finish a killed run: the demo's teachers are resumed with the demo."""
    parent_config = run_dir.parent / "config.yaml"
    if run_dir.name == "teachers" and parent_config.is_file() and \
            parent_config.read_text().startswith("# ensemble-kd demo"):
        return f"ensemble-kd demo --resume {run_dir.parent}"
    return f"ensemble-kd train-teachers --resume {run_dir}"
