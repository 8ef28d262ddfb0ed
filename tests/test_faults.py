"""Faults met as a user meets them (issue 19): a disk that fills while a file is written, damaged
teacher caches and their remedy, an interrupted cache build. Each ends in one sentence naming the
file and what to do, and loses no work that was already committed."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

from ensemble_kd.cli import main
from ensemble_kd.engine import checkpoint

TINY = ["device=cpu", "student.arch=mlp", "student.kwargs={hidden_sizes: [32]}", "student.train.epochs=1",
        "student.train.checkpoint_every=2", "data.batch_size=256", "eval.latency=false"]


def _error(capsys) -> str:
    """stderr, which must be one sentence: no traceback."""
    text = capsys.readouterr().err.strip()
    assert "Traceback" not in text, text[-3000:]
    return " ".join(text.split())


class _FullFile(io.RawIOBase):
    """A new file on a disk with `room` bytes left: the write that passes it fails with ENOSPC. It has
    no fileno, so numpy writes through write() too (not past it with tofile)."""

    def __init__(self, fd: int, room: int):
        self.fd, self.room = fd, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return os.write(self.fd, data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class _DiskFullAt:
    """engine.checkpoint's `os`, whose atomic writes of files named `name` (their temporary files) fill
    the disk after `room` bytes, as a real one does: torch.save then raises a RuntimeError."""

    def __init__(self, name: str):
        self.name = name
        self.room = 200 if name.endswith((".pt", ".npy", ".safetensors")) else 0  # mid-file, or a small text file

    def __getattr__(self, attr):
        return getattr(os, attr)

    def fdopen(self, fd: int, mode: str = "r"):
        if f".{self.name}." in os.readlink(f"/proc/self/fd/{fd}"):
            return io.BufferedWriter(_FullFile(fd, self.room), buffer_size=64)
        return os.fdopen(fd, mode)


@pytest.mark.parametrize("name", ["last.pt", "model.pt", "model.safetensors", "model.json", "results.json",
                                  "results.md"])
def test_a_disk_that_fills_while_a_run_saves_is_one_sentence_naming_the_file(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr(checkpoint, "os", _DiskFullAt(name))
    assert main(["distill", f"run.dir={tmp_path}", "run.name=r", *TINY]) == 2
    message = _error(capsys)
    run = tmp_path / "r"
    assert f"No space left on device '{run / name}'; the disk is full: free some space, then continue with " \
           f"--resume {run}" in message, message
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- teacher caches

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A train-teachers run directory of two untrained teachers: training them adds nothing here."""
    import torch

    from ensemble_kd.engine import save_model
    from ensemble_kd.ensemble import write_manifest
    from ensemble_kd.models import create

    run, entries = tmp_path_factory.mktemp("teachers"), []
    torch.manual_seed(0)
    for name, arch in (("00-small_cnn", "small_cnn"), ("01-mlp", "mlp")):
        member = create(arch, num_classes=10, in_channels=1)
        save_model(member, run / "members" / name / "model.pt")
        entries.append({"name": name, "spec": member.spec, "checkpoint": f"members/{name}/model.pt"})
    write_manifest(run, entries)
    return run


def _cache_argv(teacher_run, cache: Path, *extra) -> list[str]:
    return ["cache-teachers", f"teachers.source={teacher_run}", f"cache.dir={cache}", "cache.epochs=2",
            "data.eval_batch_size=256", "cache.shard_size=512", *TINY, *extra]


@pytest.mark.parametrize("name", ["epoch_001.rank0.shard00001.logits.npy", "progress.rank0.json", "cache.json",
                                  "epoch_001.logits.npy"])
def test_a_disk_that_fills_while_a_cache_is_built_is_one_sentence_naming_the_file(teacher_run, tmp_path, capsys,
                                                                                 monkeypatch, name):
    cache = tmp_path / "cache"
    if name == "epoch_001.logits.npy":  # gathered through a memory map: its blocks are reserved first
        real = os.posix_fallocate

        def fallocate(fd, offset, length):
            if ".epoch_001.logits.npy" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, offset, length)
        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    else:
        monkeypatch.setattr(checkpoint, "os", _DiskFullAt(name))
    assert main(_cache_argv(teacher_run, cache)) == 2
    message = _error(capsys)
    assert f"No space left on device '{cache / name}'; the disk is full: free some space, then continue with " \
           f"--resume {cache}" in message, message
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def _contents(cache: Path) -> dict[str, bytes]:
    """The cache's files and bytes; config.yaml, fingerprint.json and the lock are the run directory's."""
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir())
            if p.name.startswith(("epoch_", "cache.json", "progress"))}


@pytest.fixture(scope="module")
def built(teacher_run, tmp_path_factory):
    cache = tmp_path_factory.mktemp("built") / "cache"
    assert main(_cache_argv(teacher_run, cache)) == 0
    return cache, _contents(cache)


CACHE_DAMAGE = {  # file -> what a bad copy, a full disk or a hand leaves of it
    "cache.json": {"garbage bytes": lambda p: p.write_bytes(b"\xff\xfe\x00 not text"),
                   "a JSON list": lambda p: p.write_text("[1, 2]"),
                   "truncated": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
                   "another shape": lambda p: p.write_text('{"fingerprint": 3, "complete": true, "epochs": 2, '
                                                          '"top_k": null, "names": []}')},
    "epoch_001.logits.npy": {"deleted": Path.unlink,
                             "truncated": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
                             "cut in its header": lambda p: p.write_bytes(p.read_bytes()[:40])},
    "epoch_000.present.npy": {"deleted": Path.unlink,
                              "of other rows": lambda p: p.write_bytes(p.read_bytes()[:-100])},
}
CASES = [(name, how) for name, hows in CACHE_DAMAGE.items() for how in hows]


@pytest.mark.parametrize("name, how", CASES, ids=[f"{n} {h}" for n, h in CASES])
def test_a_damaged_cache_is_named_by_distill_and_rebuilt_whole_by_cache_teachers(teacher_run, built, tmp_path,
                                                                                capsys, name, how):
    """Found in a fault sweep: the remedy distill names, cache-teachers, crashed on a damaged cache.json
    (AttributeError, or a bare codec error), and answered "already built" over a deleted or cut array."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    CACHE_DAMAGE[name][how](cache / name)
    capsys.readouterr()
    distill = ["distill", "method.name=kd", f"teachers.cache={cache}", f"teachers.source={teacher_run}",
               f"run.dir={tmp_path}", "run.name=student", *TINY]
    assert main(distill) == 2
    message = _error(capsys)
    assert f"{name}' is damaged" in message or f"incomplete: {name} is" in message, message
    assert "cache-teachers" in message and not (tmp_path / "student").exists()
    assert main(_cache_argv(teacher_run, cache)) == 0
    said = _error(capsys)
    assert "already built" not in said
    assert _contents(cache) == built[1]  # whole again: the same bytes as the first build
    if (name, how) == CASES[0]:  # and read: a student trains from it
        assert main(distill) == 0


# ---------------------------------------------------------------------------- interrupted cache builds

def _scale():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import _cache_fakes
    return _cache_fakes


N = 3000
WHOLE_DATA = dict(epochs=2, top_k=10, batch_size=256, shard_size=10**6)  # one shard would hold all 12 batches


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from ensemble_kd.ensemble.cache import build_cache

    fakes = _scale()
    out = build_cache(fakes.fake_teachers(), fakes.FakeLoader(N), tmp_path_factory.mktemp("whole"), **WHOLE_DATA)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("sig", [signal_name for signal_name in ("SIGINT", "SIGTERM")])
def test_a_signal_commits_what_the_build_computed_and_the_resume_ends_byte_identical(uninterrupted, tmp_path, sig):
    """Found in a real trial: cache.shard_size exceeded the data, so 14 minutes of work were never committed
    and --resume started from zero, after a message saying a checkpoint was saved."""
    import json
    import signal

    from ensemble_kd.ensemble.cache import build_cache, describe_kept

    fakes = _scale()

    class Signalled(fakes.FakeLoader):
        def batches_at(self, index_batches, view_epoch):
            for batch in super().batches_at(index_batches, view_epoch):
                if self.yielded == 12 + 4:  # batch 4 of epoch 1
                    os.kill(os.getpid(), getattr(signal, sig))
                yield batch

    teachers = fakes.fake_teachers()
    handler_before = signal.getsignal(getattr(signal, sig))  # SIG_IGN when pytest runs as a background job
    with pytest.raises(KeyboardInterrupt):
        build_cache(teachers, Signalled(N), tmp_path, **WHOLE_DATA)
    record = json.loads((tmp_path / "progress.rank0.json").read_text())
    assert record["batches"] == [[12], [4]] and record["rows"] == [[N], [4 * 256]]
    assert describe_kept(tmp_path) == f"2 shards holding {N + 1024:,} of {2 * N:,} teacher views are kept"
    assert signal.getsignal(getattr(signal, sig)) == handler_before  # the build's handlers are gone
    loader = fakes.FakeLoader(N)
    build_cache(teachers, loader, tmp_path, **WHOLE_DATA)
    assert loader.yielded == 12 - 4
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())} == uninterrupted


def test_a_build_commits_every_few_minutes_so_a_kill_loses_minutes_at_most(uninterrupted, tmp_path, monkeypatch):
    import json

    from ensemble_kd.ensemble import cache
    from ensemble_kd.ensemble.cache import build_cache

    fakes = _scale()
    now = [0.0]

    def clock():  # each reading 50 s later: a commit every 3 batches at COMMIT_SECONDS = 120
        now[0] += 50.0
        return now[0]
    monkeypatch.setattr(cache, "_clock", clock)
    teachers = fakes.fake_teachers()
    with pytest.raises(RuntimeError, match="killed"):  # no cleanup: what is committed is what the clock made
        build_cache(teachers, fakes.KillingLoader(N, after=8), tmp_path, **WHOLE_DATA)
    assert json.loads((tmp_path / "progress.rank0.json").read_text())["batches"] == [[3, 3], []]
    loader = fakes.FakeLoader(N)
    build_cache(teachers, loader, tmp_path, **WHOLE_DATA)
    assert loader.yielded == 2 * 12 - 6
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())} == uninterrupted


def test_an_interrupted_cache_teachers_says_what_is_kept_and_resumes(teacher_run, tmp_path, capsys, monkeypatch):
    import signal

    from ensemble_kd.ensemble import TeacherSet

    argv = _cache_argv(teacher_run, tmp_path / "whole", "cache.shard_size=65536")
    assert main(argv) == 0
    whole = _contents(tmp_path / "whole")
    real, calls = TeacherSet.outputs, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(TeacherSet, "outputs", interrupted)
    cache = tmp_path / "cache"
    assert main(_cache_argv(teacher_run, cache, "cache.shard_size=65536")) == 130
    said = _error(capsys)
    assert said.endswith(f"interrupted: 1 shard holding 768 of 2,426 teacher views are kept; continue with "
                         f"--resume {cache}"), said
    (cache / "epoch_000.rank0.shard00000.logits.npy").write_bytes(b"")  # and one cut by a copy: computed again
    monkeypatch.setattr(TeacherSet, "outputs", real)
    assert main(["cache-teachers", "--resume", str(cache)]) == 0
    assert "epoch_000.rank0.shard00000.logits.npy is damaged" in _error(capsys)
    assert _contents(cache) == whole


def test_a_run_interrupted_before_its_first_checkpoint_does_not_claim_one(tmp_path, capsys, monkeypatch):
    from ensemble_kd import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "distill", interrupted)
    assert main(["distill", f"run.dir={tmp_path}", "run.name=r", *TINY]) == 130
    said = _error(capsys)
    assert said == f"interrupted: nothing was checkpointed yet (a resume starts over); continue with --resume " \
                   f"{tmp_path / 'r'}", said
