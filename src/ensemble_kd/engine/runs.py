"""Run directories: the resolved config, metrics.jsonl, checkpoints, results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import Config, dump_config
from . import tracking
from .checkpoint import atomic_write_text


class MetricsLog:
    """Appends one JSON record per line; the file survives a killed run line by line.

    Every record the trainer writes says its `kind` (`step` or `epoch`). The lines are strict
    JSON: a non-finite value is written as null and its key listed in the record's `nonfinite`.
    Under logging.tensorboard / logging.mlflow each record is mirrored to the trackers (engine/tracking.py).
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        plain, nonfinite = {}, []
        for key, value in record.items():
            plain[key], finite = _plain(value)
            if not finite:
                nonfinite.append(key)
        if nonfinite:
            plain["nonfinite"] = nonfinite
        with self.path.open("a") as f:
            f.write(json.dumps(plain, allow_nan=False) + "\n")
        if (tracker := tracking.active()) is not None:  # after the file: a kill loses nothing it lacks
            tracker.record(self.path, plain, self.read)

    def read(self) -> list[dict]:
        return [record for record in self._lines() if record is not None]

    def rewind(self, keep) -> None:
        """Keep only the records `keep(record)` accepts (and drop a line torn by a kill), atomically:
        a resumed run rewinds its log to its checkpoint so it logs no step twice."""
        if not self.enabled:
            return
        kept = [r for r in self._lines() if r is not None and keep(r)]
        if self.path.is_file():
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        if (tracker := tracking.active()) is not None:  # the trackers' copies rewound with it
            tracker.replace(self.path, kept)

    def _lines(self) -> list[dict | None]:
        """The records; None for a line that is not JSON, which only a killed writer's last line may be."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"'{self.path}' line {i + 1} is not JSON; the file is damaged") from None
                records.append(None)
        return records


def _plain(value) -> tuple[object, bool]:
    """A JSON value and whether it was finite (non-finite floats become None)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None, False
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return [v for v, _ in items], all(ok for _, ok in items)
    return value, True


def write_config(run_dir: Path, config: Config, command: str, listing: dict | None = None) -> None:
    """config.yaml, headed by the command that made the run, and fingerprint.json: the teachers it reads
    and `listing`, the streamed training listing (run_dir.data_listing)."""
    from ..distributed import world

    if not world().is_main:
        return
    from .run_dir import write_fingerprint

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", f"# ensemble-kd {command}\n" + dump_config(config))
    tracking.start(run_dir, config)
    write_fingerprint(run_dir, config, listing)  # what it reads, so a reuse can tell it changed
