"""What a run is, checked before anything is written (issue 19): the command that made a run
directory, the demo's students, safe run and variant names, the data a model is scored on,
overrides that change one key only, the listing a streamed run trained on, method options that
need the models, and a killed run's DataLoader workers.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ensemble_kd.cli import main
from ensemble_kd.config import ConfigError, load_config
from ensemble_kd.engine.runs import write_config

TINY = ["student.train.epochs=1", "teachers.train.epochs=1", "student.kwargs={width: 0.25}",
        "teachers.kwargs={width: 0.25}", "eval.latency=false", "data.batch_size=256", "device=cpu"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _error(capsys) -> str:
    """stderr, which must be one sentence: no traceback."""
    text = capsys.readouterr().err.strip()
    assert "Traceback" not in text
    return " ".join(text.split())


def _files(run_dir) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    assert main(["train-teachers", f"run.dir={root}", "run.name=t", "teachers.count=2", *TINY]) == 0
    return root / "t"


# ---------------------------------------------------------------------- 1: a run is resumed by its command

KINDS = {"demo": "demo --methods ce", "train-teachers": "train-teachers", "distill": "distill",
         "cache-teachers": "cache-teachers", "sweep": "sweep"}


def _made_by(root: Path, header: str) -> Path:
    """A run directory as `header` writes it (its config.yaml), with the marker files of its kind."""
    run = root / header.split()[0]
    write_config(run, load_config(None, TINY), header)
    return run


@pytest.mark.parametrize("command", list(KINDS))
def test_a_run_is_resumed_only_by_the_command_that_made_it(command, tmp_path, capsys):
    for kind, header in KINDS.items():
        if kind == command:
            continue
        run = _made_by(tmp_path, header)
        before = _files(run)
        assert main([command, "--resume", str(run)]) == 2, kind
        message = _error(capsys)
        assert f"cannot resume '{run}' with {command}: it holds a {kind} run" in message
        assert f"ensemble-kd {kind} --resume {run}" in message
        assert _files(run) == before


def test_distill_never_trains_inside_a_teacher_run(teachers, capsys):
    before = _files(teachers)
    assert main(["distill", "--resume", str(teachers)]) == 2
    assert "it holds a train-teachers run" in _error(capsys)
    assert _files(teachers) == before


@pytest.mark.parametrize("kind", ["distill", "train-teachers", "sweep"])
def test_a_cache_is_never_built_inside_another_commands_run(kind, tmp_path, capsys):
    run = _made_by(tmp_path, kind)
    before = _files(run)
    assert main(["cache-teachers", f"cache.dir={run}", *TINY]) == 2
    assert f"cache.dir '{run}' holds a {kind} run; choose another cache.dir" in _error(capsys)
    assert _files(run) == before


def test_a_sweep_never_adopts_a_student_run(tmp_path, capsys):
    run = _made_by(tmp_path, "distill")
    before = _files(run)
    assert main(["sweep", f"run.dir={tmp_path}", "run.name=distill", *TINY]) == 2
    assert "holds an unfinished run" in _error(capsys)
    assert _files(run) == before


# ---------------------------------------------------------------------- 2: the demo's --methods is part of the run

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", f"run.dir={root}", "run.name=d", "--methods", "ce,aver", "teachers.count=2", *TINY]) == 0
    return root / "d"


def test_a_resumed_demo_trains_the_students_it_was_started_with(demo, tmp_path):
    import shutil
    run = tmp_path / "d"
    shutil.copytree(demo, run)
    for gone in ["results.json", "results.md"]:  # as if killed while the aver student trained
        (run / gone).unlink()
    shutil.rmtree(run / "student-aver")
    assert main(["demo", "--resume", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("student")) == ["student", "student-aver"]
    names = [r["name"] for r in json.loads((run / "results.json").read_text())]
    assert [n.split(" (")[0] for n in names if n.startswith("student")] == ["student alone", "student aver"]


def test_a_resumed_demo_refuses_other_methods_naming_both(demo, capsys):
    before = _files(demo)
    assert main(["demo", "--resume", str(demo), "--methods", "ce,kd"]) == 2
    message = _error(capsys)
    assert f"cannot resume '{demo}' with --methods ce,kd: it was started with --methods ce,aver" in message
    assert _files(demo) == before
    assert main(["demo", "--resume", str(demo), "--methods", "ce,aver"]) == 0  # the same list: resumed


# ---------------------------------------------------------------------- 14, 16: one short sentence

@pytest.mark.parametrize("override, words", [
    ("student.train.optim.lr=[", "override 'student.train.optim.lr=[' has a value that is not valid YAML"),
    ("student.kwargs=!!python/object/apply:os.system [echo]", "could not determine a constructor"),
    ("student.kwargs={a: [1,}", "not valid YAML"),
])
def test_a_malformed_override_value_is_one_sentence(override, words, tmp_path, capsys):
    assert main(["distill", override, f"run.dir={tmp_path}", "run.name=r"]) == 2
    message = _error(capsys)
    assert words in message and len(message) < 300
    assert not (tmp_path / "r").exists()


def test_a_yaml_alias_bomb_is_a_short_message(tmp_path, capsys):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i, name in enumerate("bcdefg"):
        prev = "abcdefg"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("student: {arch: *g}")
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")
    assert main(["distill", str(config), f"run.dir={tmp_path}"]) == 2
    message = _error(capsys)
    assert "config key 'student.arch'" in message and len(message) < 300


def test_a_callable_that_is_not_a_model_builder_is_named_so(tmp_path, capsys):
    assert main(["distill", "student.arch=os:system", f"run.dir={tmp_path}", "run.name=r"]) == 2
    message = _error(capsys)
    assert "'os:system' is not a model builder" in message and "kwargs" not in message
    assert not (tmp_path / "r").exists()


def test_the_temperature_note_says_what_each_bound_means():
    from ensemble_kd.metrics.temperature import T_MAX, T_MIN
    from ensemble_kd.report import TEMPERATURE_NOTE
    low, high = TEMPERATURE_NOTE.split(f"T={T_MAX:g}", 1)[0], TEMPERATURE_NOTE.split(f"T={T_MAX:g}", 1)[1]
    assert f"T={T_MIN:g}" in low and "classified right" in low  # the lower bound: separable validation split
    assert "classified" not in high and "uniform" in high  # the upper one: no better than chance


def test_evaluating_a_checkpoint_never_replaces_another_runs_results(teachers, tmp_path, capsys):
    import shutil
    run = tmp_path / "t"
    shutil.copytree(teachers, run)
    before = _files(run)
    member = sorted(run.glob("members/*/model.pt"))[0]
    assert main(["evaluate", str(member), "--out", str(run), "eval.latency=false"]) == 2
    assert f"'{run}' holds a train-teachers run" in _error(capsys)
    assert _files(run) == before
    assert main(["evaluate", str(member), "--out", str(tmp_path / "ev"), "eval.latency=false"]) == 0


def test_two_caches_in_one_directory_advise_cache_dir(teachers, tmp_path, capsys):
    from ensemble_kd.engine.run_dir import RunLock
    cache = tmp_path / "cache"
    cache.mkdir()
    with RunLock(cache):  # another cache-teachers building there (flock: a second open conflicts)
        assert main(["cache-teachers", f"teachers.source={teachers}", f"cache.dir={cache}", *TINY]) == 2
    message = _error(capsys)
    assert "is in use by another ensemble-kd process" in message and message.endswith("choose another cache.dir")


# ---------------------------------------------------------------------- 4: every model scored on data is checked

def _fashion_record(record: dict) -> dict:
    return {**record, "name": "fashion-mnist", "image_size": [28, 28],
            "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]}


@pytest.mark.parametrize("target", ["model.pt", "last.pt", "run"])
def test_a_model_of_other_data_is_refused_by_every_evaluate(target, teachers, tmp_path, capsys):
    """A Fashion-MNIST checkpoint (its recorded data) is not scored on digits, whichever file names it."""
    import shutil

    import torch
    member = tmp_path / "m"
    shutil.copytree(sorted(teachers.glob("members/*"))[0], member)
    sidecar = json.loads((member / "model.json").read_text())
    (member / "model.json").write_text(json.dumps({**sidecar, "data": _fashion_record(sidecar["data"])}))
    state = torch.load(member / "last.pt", weights_only=True)
    torch.save({**state, "data": _fashion_record(state["data"])}, member / "last.pt")
    config = tmp_path / "digits.yaml"
    config.write_text("data: {name: digits}\n")
    if target == "run":  # a run directory of its own, as a student run is
        write_config(member, load_config(config), "distill")
    path = member if target == "run" else member / target
    assert main(["evaluate", str(path), "--config", str(config), "eval.latency=false"]) == 2
    message = _error(capsys)
    assert "was trained on fashion-mnist (28x28" in message and "this run's data is digits (8x8" in message
    assert not (tmp_path / "m" / f"{Path(target).stem}-eval").exists()
    assert main(["evaluate", str(path), "--config", str(config), "eval.latency=false",
                 "teachers.allow_other_data=true"]) == 0  # said to be intended
