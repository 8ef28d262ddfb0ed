"""Run integrity: no run directory is ever silently stale, mixed or overwritten (issue 10).

Each test reproduces a failure first seen as a user: a sweep reusing runs made with another
config, a resume that changes the training, two processes in one directory, a checkpoint's
evaluation written over its run's results, a demo that checks its options after the work,
and faults that ended in a traceback instead of one sentence.
"""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ensemble_kd.cli import LineProgress, main

sys.path.insert(0, str(Path(__file__).parent))
from _runs import files as _files, one_sentence as _error  # noqa: E402

TINY = ["student.train.epochs=1", "teachers.train.epochs=1", "student.kwargs={width: 0.25}",
        "teachers.kwargs={width: 0.25}", "eval.latency=false", "data.batch_size=256"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _rows(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    assert main(["train-teachers", f"run.dir={root}", "run.name=t", "teachers.count=2", *TINY]) == 0
    return root / "t"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A finished ce run, copied by the tests that change it."""
    root = tmp_path_factory.mktemp("student")
    assert main(["distill", f"run.dir={root}", "run.name=s", "student.train.checkpoint_every=3", *TINY]) == 0
    return root / "s"


def _copy(run_dir, to):
    import shutil
    shutil.copytree(run_dir, to)
    return to


# ---------------------------------------------------------------------- 1, 2: sweeps

def test_a_sweep_never_reports_runs_made_with_another_config(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("sweep:\n  variants:\n    plain: {method.name: ce}\n")
    argv = ["sweep", str(config), f"run.dir={tmp_path}", "run.name=x", *TINY]
    assert main(argv) == 0
    run = tmp_path / "x" / "plain" / "seed0"
    before = _files(tmp_path / "x")
    capsys.readouterr()
    # the example: the same sweep with more epochs and a wider student printed the old rows
    assert main(argv + ["student.train.epochs=2", "student.kwargs.width=0.5"]) == 2
    captured = capsys.readouterr()
    message = " ".join(captured.err.split())
    assert str(run) in message and "student.kwargs.width (0.25 -> 0.5)" in message and "--overwrite" in message
    assert "plain" not in captured.out  # no table
    assert _files(tmp_path / "x") == before  # not even the sweep's config.yaml
    # told to, it trains the changed run again: the new config's weights, not the old
    assert main(argv + ["student.train.epochs=2", "student.kwargs.width=0.5", "--overwrite"]) == 0
    assert json.loads((run / "model.json").read_text())["spec"]["width"] == 0.5
    steps = len([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_acc" in r])
    assert steps == 2  # two epochs, from a fresh log


def test_a_sweep_with_other_evaluation_evaluates_again_without_training(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("sweep:\n  variants:\n    plain: {method.name: ce}\n")
    argv = ["sweep", str(config), f"run.dir={tmp_path}", "run.name=x", *TINY]
    assert main(argv) == 0
    run = tmp_path / "x" / "plain" / "seed0"
    weights = (run / "model.pt").read_bytes()
    assert "flops" in _rows(run)[0]
    assert main(argv + ["eval.cost=false"]) == 0
    assert (run / "model.pt").read_bytes() == weights
    assert "flops" not in _rows(run)[0] and "flops" not in _rows(tmp_path / "x")[0]


def test_a_sweep_refuses_runs_whose_teachers_were_retrained(teachers, tmp_path, capsys):
    source = _copy(teachers, tmp_path / "t")
    config = tmp_path / "sweep.yaml"
    config.write_text("sweep:\n  variants:\n    aver: {method.name: aver}\n")
    argv = ["sweep", str(config), f"teachers.source={source}", f"run.dir={tmp_path}", "run.name=x", *TINY]
    assert main(argv) == 0
    assert main(["train-teachers", f"run.dir={tmp_path}", "run.name=t", "teachers.count=2", "--overwrite",
                 "teachers.seed=5", *TINY]) == 0  # the same path, other teachers
    capsys.readouterr()
    assert main(argv) == 2
    assert "teachers.source (its manifest.json changed" in _error(capsys)


def test_a_sweep_refuses_runs_whose_weights_files_were_replaced(teachers, tmp_path, capsys):
    import shutil
    files = sorted(teachers.glob("members/*/model.safetensors"))
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / f"t{i}.safetensors")
    members = ", ".join(f"{{arch: small_cnn, kwargs: {{width: 0.25}}, seed: {i}, weights: {tmp_path}/t{i}.safetensors}}"
                        for i in range(len(files)))
    config = tmp_path / "sweep.yaml"
    config.write_text(f"teachers:\n  members: [{members}]\nsweep:\n  variants:\n    aver: {{method.name: aver}}\n")
    argv = ["sweep", str(config), f"run.dir={tmp_path}", "run.name=x", *TINY]
    assert main(argv) == 0
    shutil.copy(files[1], tmp_path / "t0.safetensors")  # another teacher under the same file name
    capsys.readouterr()
    assert main(argv) == 2
    assert "teachers.members.0.weights (its t0.safetensors changed" in _error(capsys)


def test_sweep_variants_sharing_a_folder_are_refused(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text("sweep:\n  variants:\n    lr 0.05: {student.train.optim.lr: 0.05}\n"
                      "    lr/0.05: {student.train.optim.lr: 0.1}\n")
    assert main(["sweep", str(config), f"run.dir={tmp_path}", "run.name=x", *TINY]) == 2
    message = _error(capsys)
    assert "'lr 0.05' and 'lr/0.05'" in message and "lr_0.05" in message
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- 3: resume

@pytest.mark.parametrize("override, key", [("method.name=aver", "method.name"),
                                           ("student.train.epochs=4", "student.train.epochs"),
                                           ("student.kwargs.width=1.0", "student.kwargs.width")])
def test_resume_refuses_overrides_that_change_the_result(student, tmp_path, capsys, override, key):
    run = _copy(student, tmp_path / "s")
    before = _files(run)
    assert main(["distill", "--resume", str(run), override]) == 2
    message = _error(capsys)
    assert f"with {key} (" in message and "start a new run" in message
    assert _files(run) == before  # config.yaml untouched
    assert main(["distill", "--resume", str(run)]) == 0  # still resumable


def test_resume_takes_overrides_that_cannot_change_the_result(student, tmp_path):
    run = _copy(student, tmp_path / "s")
    weights = (run / "model.pt").read_bytes()
    assert main(["distill", "--resume", str(run), "student.train.log_every=1", "eval.cost=false",
                 "device=cpu"]) == 0
    assert (run / "model.pt").read_bytes() == weights  # finished: nothing trained again
    assert "flops" not in _rows(run)[0] and "log_every: 1" in (run / "config.yaml").read_text()


def test_a_config_given_with_resume_is_checked_not_ignored(student, tmp_path, capsys):
    run = _copy(student, tmp_path / "s")
    other = tmp_path / "other.yaml"
    other.write_text("method: {name: kd}\n")
    assert main(["distill", str(other), "--resume", str(run)]) == 2
    assert "method.name ('ce' -> 'kd')" in _error(capsys)
    same = tmp_path / "same.yaml"
    same.write_text((run / "config.yaml").read_text())
    assert main(["distill", str(same), "--resume", str(run)]) == 0


def test_a_truncated_checkpoint_on_resume_is_one_sentence(student, tmp_path, capsys):
    run = _copy(student, tmp_path / "s")
    (run / "results.json").unlink()
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    assert main(["distill", "--resume", str(run)]) == 2
    message = _error(capsys)
    assert str(run / "last.pt") in message and "delete it" in message


# ---------------------------------------------------------------------- 4: one run per directory

def test_a_finished_run_is_not_taken_over_without_overwrite(student, tmp_path, capsys):
    run = _copy(student, tmp_path / "s")
    before = _files(run)
    argv = ["distill", f"run.dir={tmp_path}", "run.name=s", "student.train.checkpoint_every=3", *TINY]
    assert main(argv) == 2
    assert "holds a finished run" in _error(capsys) and _files(run) == before
    assert main(argv + ["--overwrite"]) == 0
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_acc" in r]
    assert len(epochs) == 1  # a fresh log, not one appended to the old run's


def test_an_unfinished_run_is_refused_naming_resume(student, tmp_path, capsys):
    run = _copy(student, tmp_path / "s")
    (run / "results.json").unlink()
    assert main(["distill", f"run.dir={tmp_path}", "run.name=s", *TINY]) == 2
    assert f"continue it with --resume {run}" in _error(capsys)


@pytest.mark.parametrize("argv", [["train-teachers", "teachers.arch=resnet1000"],
                                  ["distill", "method.options={C: 1}"],
                                  ["distill", "method.name=aver", "teachers.source=/nonexistent/t"]])
def test_a_refused_run_writes_nothing(argv, tmp_path, capsys):
    assert main([*argv, f"run.dir={tmp_path}", "run.name=r", *TINY]) == 2
    assert not (tmp_path / "r").exists()


def test_a_refused_run_leaves_the_existing_runs_config_alone(student, tmp_path):
    run = _copy(student, tmp_path / "s")
    before = (run / "config.yaml").read_bytes()
    assert main(["distill", f"run.dir={tmp_path}", "run.name=s", "method.options={C: 1}", *TINY]) == 2
    assert (run / "config.yaml").read_bytes() == before


def test_two_processes_never_share_a_run_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = [sys.executable, "-m", "ensemble_kd.cli", "distill", f"run.dir={tmp_path}", "run.name=busy", "device=cpu",
            *TINY]
    first = subprocess.Popen([*argv, "student.train.epochs=100000"], env=env, stderr=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    run = tmp_path / "busy"
    try:
        for _ in range(600):  # until the first has claimed the directory and started training
            if (run / "config.yaml").is_file() or first.poll() is not None:
                break
            time.sleep(0.5)
        assert first.poll() is None and (run / "config.yaml").is_file()
        config = (run / "config.yaml").read_bytes()
        second = subprocess.run([*argv, "--overwrite"], env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2
        message = " ".join(second.stderr.split())
        assert f"'{run}' is in use by another ensemble-kd process (pid {first.pid})" in message
        assert "Traceback" not in second.stderr
        assert (run / "config.yaml").read_bytes() == config and first.poll() is None
        resume = subprocess.run([*argv[:3], "distill", "--resume", str(run)], env=env, capture_output=True,
                                text=True, timeout=600)
        assert resume.returncode == 2 and "in use" in resume.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from ensemble_kd.engine.run_dir import RunLock
    with RunLock(run):  # a killed run leaves no stale lock
        pass


# ---------------------------------------------------------------------- 8: evaluate a checkpoint

def test_evaluating_a_checkpoint_never_overwrites_its_runs_results(student, tmp_path):
    run = _copy(student, tmp_path / "s")
    results = (run / "results.json").read_bytes(), (run / "results.md").read_bytes()
    assert main(["evaluate", str(run / "last.pt"), "eval.latency=false"]) == 0
    assert ((run / "results.json").read_bytes(), (run / "results.md").read_bytes()) == results
    (row,) = _rows(run / "last-eval")
    assert row["acc"] == pytest.approx(_rows(run)[0]["acc"])  # last.pt holds the final weights


# ---------------------------------------------------------------------- 9: the demo

@pytest.mark.parametrize("argv, words", [
    (["student.arch=nope"], "config key 'student': unknown model 'nope'"),
    (["--methods", "ce,aekd", "method.options.C=0.6"], "method.per_method.<method>"),
    (["--methods", "ce,aekd", "method.per_method.aekd.bogus=1"], "config key 'method.per_method.aekd'"),
    (["method.per_method.avre.alpha=1"], "unknown method 'avre'"),
])
def test_the_demo_checks_everything_before_any_work(argv, words, tmp_path, capsys):
    assert main(["demo", f"run.dir={tmp_path}", "run.name=d", *argv]) == 2
    assert words in _error(capsys)
    assert not (tmp_path / "d").exists()


def test_the_demo_takes_options_per_method(tmp_path):
    assert main(["demo", f"run.dir={tmp_path}", "run.name=d", "--methods", "ce,aekd",
                 "method.per_method.aekd.C=0.7", "method.per_method.ce.label_smoothing=0.1", *TINY]) == 0
    import yaml
    aekd = yaml.safe_load((tmp_path / "d" / "student-aekd" / "config.yaml").read_text())["method"]
    ce = yaml.safe_load((tmp_path / "d" / "student" / "config.yaml").read_text())["method"]
    assert aekd["name"] == "aekd" and aekd["options"] == {"C": 0.7}
    assert ce["name"] == "ce" and ce["options"] == {"label_smoothing": 0.1}


# ---------------------------------------------------------------------- one sentence, not a traceback

def test_a_read_only_run_dir_is_one_sentence(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "ro"
    real = os.mkdir

    def mkdir(path, *args, **kwargs):  # as a directory without write permission does (even for root)
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)
    assert main(["distill", f"run.dir={locked}", "run.name=r", *TINY]) == 2
    message = _error(capsys)
    assert "Permission denied" in message and str(locked) in message and "choose a run.dir" in message


def test_a_full_disk_is_one_sentence_and_loses_nothing_earlier(tmp_path, capsys, monkeypatch):
    from ensemble_kd.engine import checkpoint
    real, calls = os.fsync, []

    def fsync(fd):  # the 3rd atomic write (config.yaml, last.pt at step 2, then last.pt at step 4) fails
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    argv = ["distill", f"run.dir={tmp_path}", "run.name=r", "student.train.checkpoint_every=2", *TINY]
    assert main(argv) == 2
    run = tmp_path / "r"
    message = _error(capsys)
    assert "No space left on device" in message and str(run / "last.pt") in message
    assert f"free some space, then continue with --resume {run}" in message
    assert checkpoint.load_train_state(run / "last.pt")["step"] == 2  # the earlier checkpoint is whole
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(checkpoint.os, "fsync", real)
    assert main(["distill", "--resume", str(run)]) == 0


@pytest.mark.parametrize("name, flag", [("manifest.json", "teachers.source"), ("cache.json", "teachers.cache")])
def test_a_corrupt_manifest_or_cache_is_one_sentence(teachers, tmp_path, capsys, name, flag):
    where = _copy(teachers, tmp_path / "t")
    (where / name).write_text('{"members": [')
    assert main(["distill", "method.name=aver", f"{flag}={where}", f"run.dir={tmp_path}", *TINY]) == 2
    message = _error(capsys)
    assert f"'{where / name}' is damaged" in message
    assert ("train-teachers" if name == "manifest.json" else "cache-teachers") in message


def test_an_interrupted_run_names_its_directory(tmp_path, capsys, monkeypatch):
    from ensemble_kd import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "distill", interrupted)
    assert main(["distill", f"run.dir={tmp_path}", "run.name=r", *TINY]) == 130
    assert f"continue with --resume {tmp_path / 'r'}" in _error(capsys)


def test_version(capsys):
    from ensemble_kd import __version__
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ensemble-kd {__version__}"


def test_progress_lines_repeat_no_stale_loss():
    from rich.console import Console
    buffer = io.StringIO()
    progress = LineProgress(Console(file=buffer, width=200))
    task = progress.add_task("student", total=8, status="")
    for step in range(8):
        if step == 3:  # one logged loss, then none until the end
            progress.update(task, status="loss 0.500")
        progress.update(task, advance=1)
    lines = buffer.getvalue().splitlines()
    assert ["loss" in line for line in lines] == [False, True, False, False]


def test_under_torchrun_rank_0_claims_and_every_rank_refuses_together(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "ensemble_kd.cli", "distill", f"run.dir={tmp_path}", "run.name=ddp", "device=cpu", *TINY]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "ddp" / "results.json").is_file() and (tmp_path / "ddp" / ".lock").is_file()
    before = _files(tmp_path / "ddp")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # no rank waits forever
    assert second.returncode != 0 and "holds a finished run" in " ".join(second.stderr.split())
    assert _files(tmp_path / "ddp") == before
