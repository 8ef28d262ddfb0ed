"""What a run directory records: file modes, metrics.jsonl, complete manifests, the data of every
checkpoint, and checkpoints that are finite in weights and buffers."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from ensemble_kd.cli import main

CPU_TINY = ["device=cpu", "data.batch_size=128", "eval.latency=false", "teachers.kwargs={width: 0.25}",
            "student.kwargs={width: 0.25}", "teachers.train.epochs=1", "student.train.epochs=1"]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_every_file_follows_the_umask(tmp_path, umask_022, capsys):
    """Results, configs, checkpoints, manifests and cache files are 0644 under umask 022, as any new file."""
    teachers = tmp_path / "teachers"
    assert main(["train-teachers", *CPU_TINY, "teachers.count=1", f"run.dir={tmp_path}", "run.name=teachers"]) == 0
    assert main(["cache-teachers", *CPU_TINY, f"teachers.source={teachers}", "cache.epochs=1",
                 f"cache.dir={tmp_path / 'cache'}"]) == 0
    capsys.readouterr()
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    names = {p.name for p in files}
    for expected in ["results.json", "results.md", "config.yaml", "manifest.json", "model.pt", "model.json",
                     "last.pt", "cache.json", "metrics.jsonl"]:
        assert expected in names
    assert any(p.parent.name == "cache" and p.suffix == ".pt" for p in files)  # the cached logits
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
