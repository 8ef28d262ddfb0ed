"""The teacher set: M frozen networks, any mix of architectures, one interface.

Built from plain nn.Modules, from checkpoints, or from the manifest a
`train-teachers` run writes. Members always run in eval mode without gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..methods import Needs, TeacherOutput
from ..models import forward_with_taps

MANIFEST = "manifest.json"


class TeacherSet(nn.Module):
    def __init__(self, members: Sequence[nn.Module], names: Sequence[str] | None = None):
        super().__init__()
        if not members:
            raise ValueError("a teacher set needs at least one member")
        self.members = nn.ModuleList(members)
        self.names = list(names) if names is not None else [f"teacher{i}" for i in range(len(members))]
        if len(self.names) != len(self.members):
            raise ValueError(f"{len(self.members)} teachers but {len(self.names)} names")
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TeacherSet":
        return super().train(False)  # teachers stay frozen in eval mode

    def __len__(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_checkpoints(cls, paths: Sequence[str | Path], names=None, device="cpu") -> "TeacherSet":
        from ..engine.checkpoint import load_model

        models = [load_model(p, map_location=device) for p in paths]
        return cls(models, names or [Path(p).parent.name or Path(p).stem for p in paths])

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu") -> "TeacherSet":
        """Members listed in a train-teachers run's manifest.json."""
        run_dir = Path(run_dir)
        path = run_dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"'{run_dir}' has no {MANIFEST}: is it a finished train-teachers run?")
        manifest = json.loads(path.read_text())
        members = manifest["members"]
        return cls.from_checkpoints([run_dir / m["checkpoint"] for m in members],
                                    [m["name"] for m in members], device=device)

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
        return torch.stack([m(x).float() for m in self.members])

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).softmax(-1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's prediction: the mean of member probabilities (not logits)."""
        return self.member_probs(x).mean(0)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, needs: Needs, *, index=None, epoch=None) -> TeacherOutput:
        """What a method declared it needs, computed once per member.

        `index` and `epoch` name the view; online teachers ignore them, a cache reads by them.
        """
        logits, taps = [], {name: [] for name in needs.teacher_taps}
        for m in self.members:
            if needs.teacher_taps:
                out, got = forward_with_taps(m, x, needs.teacher_taps)
                for name in needs.teacher_taps:
                    taps[name].append(got[name])
            else:
                out = m(x)
            logits.append(out.float())
        return TeacherOutput(torch.stack(logits) if needs.teacher_logits else None, taps)


def majority_vote(member_probs: torch.Tensor) -> torch.Tensor:
    """(M, B, K) -> (B,) class with most votes; ties go to the highest mean probability."""
    num_classes = member_probs.shape[-1]
    votes = nn.functional.one_hot(member_probs.argmax(-1), num_classes).sum(0).float()
    return (votes + 1e-3 * member_probs.mean(0)).argmax(-1)


def write_manifest(run_dir: Path, members: list[dict]) -> None:
    from ..engine.checkpoint import atomic_write_text

    atomic_write_text(run_dir / MANIFEST, json.dumps({"members": members}, indent=2))
