"""Run directories: the resolved config, metrics.jsonl, checkpoints, results."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..config import Config, dump_config
from .checkpoint import atomic_write_text


class MetricsLog:
    """Appends one JSON record per line; the file survives a killed run line by line."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def new_run_dir(config: Config, command: str) -> Path:
    """runs/<name>, or runs/<command>-<timestamp> when the config names none."""
    root = Path(config.run.dir)
    name = config.run.name or f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = root / name
    suffix = 1
    while config.run.name is None and path.exists():
        suffix += 1
        path = root / f"{name}-{suffix}"
    return path


def write_config(run_dir: Path, config: Config, command: str) -> None:
    from .distributed import world

    if not world().is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", f"# ensemble-kd {command}\n" + dump_config(config))
