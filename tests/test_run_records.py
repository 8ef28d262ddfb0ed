"""What a run directory records: file modes, metrics.jsonl, complete manifests, the data of every
checkpoint, and checkpoints that are finite in weights and buffers."""

import json
import os
import re
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
    assert any(p.parent.name == "cache" and p.suffix == ".npy" for p in files)  # the cached logits
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# ---------------------------------------------------------------------------- metrics.jsonl

def test_metrics_records_are_strict_json_with_a_kind_and_their_non_finite_keys(tmp_path):
    import math

    import torch

    from ensemble_kd.engine.runs import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"kind": "step", "step": 1, "loss": float("nan"), "kl": torch.tensor(float("inf")),
               "alpha": [0.5, float("-inf")], "lr": 0.1})

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"kind": "step", "step": 1, "loss": None, "kl": None, "alpha": [0.5, None], "lr": 0.1,
                      "nonfinite": ["loss", "kl", "alpha"]}
    assert not math.isnan(record["lr"])


# Runs in a subprocess: trains with a clock that advances one second per step, and at step KILL_AT
# kills itself with SIGKILL (no handler, no checkpoint).
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from ensemble_kd import pipeline
    from ensemble_kd.config import load_config
    from ensemble_kd.engine import Trainer
    from ensemble_kd.methods.ce import CrossEntropy

    class Ticking(CrossEntropy):
        def __init__(self, kill_at=None):
            super().__init__()
            self.clock, self.kill_at = 0.0, kill_at

        def loss(self, batch, student, teachers=None):
            self.clock += 1.0
            if self.clock == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().loss(batch, student, teachers)

    def trainer(out_dir, method, overrides):
        config = load_config(None, overrides)
        data = pipeline.prepare_data(config)
        model = pipeline.build_model(config.teachers.resolved_members()[0], data)
        t = Trainer(model, method, data.train_loader(config.data, seed=0), config.teachers.train, out_dir,
                    device=data.device, seed=0)
        t.clock = lambda: method.clock
        return t

    if __name__ == "__main__":
        trainer(sys.argv[1], Ticking(kill_at=7), sys.argv[2:]).fit()
""")


def test_a_run_killed_and_resumed_logs_each_step_once_and_counts_both_processes_time(tmp_path):
    overrides = ["device=cpu", "data.batch_size=128", "teachers.kwargs={width: 0.25}", "teachers.train.epochs=2",
                 "teachers.train.checkpoint_every=4", "teachers.train.log_every=1", "data.val_fraction=0"]
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, str(script), str(run), *overrides], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    log = run / "metrics.jsonl"
    assert [r["step"] for r in map(json.loads, log.read_text().splitlines())] == [1, 2, 3, 4, 5, 6]
    with log.open("a") as f:
        f.write('{"kind": "step", "st')  # a line torn by the kill

    sys.path.insert(0, str(tmp_path))
    try:
        from killed_run import Ticking, trainer
    finally:
        sys.path.remove(str(tmp_path))
    resumed = trainer(run, Ticking(), overrides)
    resumed.fit(resume=True)  # from the checkpoint of step 4
    steps_per_epoch = resumed.steps_per_epoch
    total = 2 * steps_per_epoch
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["kind"] for r in records} == {"step", "epoch"}
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, total + 1))
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    # One clock second per step: 4 steps checkpointed by the killed process, the rest by this one.
    assert resumed.train_time_s == total
    assert [r["train_time_s"] for r in epochs] == [steps_per_epoch, total]
    assert [r["seconds"] for r in epochs] == [steps_per_epoch, steps_per_epoch]


# ---------------------------------------------------------------------------- finite checkpoints

def _digits_trainer(out_dir, overrides=()):
    from ensemble_kd import pipeline
    from ensemble_kd.config import load_config
    from ensemble_kd.engine import Trainer
    from ensemble_kd.methods import create_method

    config = load_config(None, ["device=cpu", *overrides])
    data = pipeline.prepare_data(config)
    model = pipeline.build_model(config.teachers.resolved_members()[0], data)
    return Trainer(model, create_method("ce"), data.train_loader(config.data, seed=0), config.teachers.train,
                   out_dir, device=data.device, seed=0)


def test_a_checkpoint_is_written_only_when_its_weights_and_buffers_are_finite(tmp_path):
    """lr=1e4: BatchNorm's running_var overflows while the loss is still finite; that state is never
    saved, and the error names the checkpoint that is finite."""
    import torch

    from ensemble_kd.engine import NonFiniteLossError
    from ensemble_kd.engine.checkpoint import load_train_state

    trainer = _digits_trainer(tmp_path, ["teachers.train.optim.lr=1e4", "teachers.train.checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "running_var" in message
    named = re.search(rf"the last good checkpoint is {re.escape(str(tmp_path / 'last.pt'))} \(step (\d+)\)", message)
    assert named, message
    state = load_train_state(tmp_path / "last.pt")
    assert state["step"] == int(named.group(1)) >= 1
    floats = [v for v in state["model"].values() if v.is_floating_point()]
    floats += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert floats and all(bool(torch.isfinite(v).all()) for v in floats)


def test_resuming_a_non_finite_checkpoint_is_refused(tmp_path):
    import torch

    from ensemble_kd.engine import CheckpointError
    from ensemble_kd.engine.checkpoint import atomic_save

    trainer = _digits_trainer(tmp_path)
    state = trainer.state_dict()
    key = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][key] = torch.full_like(state["model"][key], float("inf"))  # as written before the check
    atomic_save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=rf"holds non-finite values \(model {re.escape(key)}\)"):
        _digits_trainer(tmp_path).fit(resume=True)


# ---------------------------------------------------------------------------- complete teacher runs

def test_a_killed_teacher_run_is_refused_as_a_source_until_resumed(tmp_path, monkeypatch):
    from ensemble_kd import pipeline
    from ensemble_kd.config import load_config

    config = load_config(None, [*CPU_TINY, "teachers.count=3"])
    data = pipeline.prepare_data(config)
    run = tmp_path / "teachers"
    train_one, trained = pipeline.train_one, []

    def killed_after_one(*args, **kwargs):
        if trained:
            raise KeyboardInterrupt  # the run stops while training its second member
        trained.append(1)
        return train_one(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_one", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_teachers(config, run, data=data)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] is False and len(manifest["members"]) == 1
    assert manifest["planned"] == ["00-small_cnn-s0", "01-small_cnn-s1", "02-small_cnn-s2"]

    distill = load_config(None, [*CPU_TINY, f"teachers.source={run}", "method.name=aver"])
    with pytest.raises(ValueError) as info:
        pipeline.prepare_distill(distill, data)
    message = str(info.value)
    assert "1 of 3 members; missing: 01-small_cnn-s1, 02-small_cnn-s2" in message
    assert f"`ensemble-kd train-teachers --resume {run}`" in message

    monkeypatch.setattr(pipeline, "train_one", train_one)
    teachers = pipeline.train_teachers(config, run, data=data, resume=True)
    assert len(teachers) == 3 and json.loads((run / "manifest.json").read_text())["complete"] is True
    _, loaded = pipeline.prepare_distill(distill, data)
    assert len(loaded) == 3


def test_a_manifest_from_before_complete_was_recorded_loads_its_members(tmp_path):
    from ensemble_kd.engine import save_model
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.models import create

    member = create("small_cnn", num_classes=10, in_channels=1, width=0.25)
    save_model(member, tmp_path / "members" / "a" / "model.pt")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"members": [{"name": "a", "spec": member.spec, "checkpoint": "members/a/model.pt"}]}))
    assert TeacherSet.from_run(tmp_path).names == ["a"]


# ---------------------------------------------------------------------------- the data of every checkpoint

def _write_idx(path, array):
    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fashion_like(tmp_path):
    """A tiny Fashion-MNIST in IDX files: 28x28 grey images, its ten class names."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "fashion"
    root.mkdir()
    for prefix, n in (("train", 80), ("t10k", 20)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def test_teachers_of_other_data_are_refused_unless_intended(tmp_path, fashion_like):
    from ensemble_kd import pipeline
    from ensemble_kd.config import ConfigError, load_config
    from ensemble_kd.data import dataset_record
    from ensemble_kd.engine.checkpoint import load_train_state
    from ensemble_kd.models.inputs import input_description

    fashion = load_config(None, [*CPU_TINY, "teachers.count=1", "data.name=fashion-mnist",
                                 f"data.root={fashion_like}", "data.batch_size=16"])
    fashion_data = pipeline.prepare_data(fashion)
    run = tmp_path / "teachers"
    pipeline.train_teachers(fashion, run, data=fashion_data)
    # the record is kept with the member's model file, its training state and the manifest
    record = dataset_record(fashion_data.splits)
    assert record["name"] == "fashion-mnist" and record["image_size"] == [28, 28] and record["classes"][0] == "T-shirt/top"
    member = run / "members" / "00-small_cnn-s0"
    assert json.loads((member / "model.json").read_text())["data"] == record
    assert load_train_state(member / "last.pt")["data"] == record
    assert json.loads((run / "manifest.json").read_text())["members"][0]["data"] == record

    digits = pipeline.prepare_data(load_config(None, CPU_TINY))  # ten classes too: the class count alone passes
    distill = [*CPU_TINY, f"teachers.source={run}", "method.name=aver"]
    with pytest.raises(ConfigError) as info:
        pipeline.prepare_distill(load_config(None, distill), digits)
    message = str(info.value)
    assert "teacher 00-small_cnn-s0 was trained on fashion-mnist (28x28" in message
    assert "this run's data is digits (8x8" in message
    assert "differ in name, classes, image size" in message and "teachers.allow_other_data=true" in message
    _, teachers = pipeline.prepare_distill(load_config(None, [*distill, "teachers.allow_other_data=true"]), digits)
    assert len(teachers) == 1
    # the same data with other statistics (another validation split) is the same dataset: the teacher
    # is not refused, its inputs are re-normalised to the statistics it was trained with
    other_split = pipeline.prepare_data(fashion.model_copy(update={"data": fashion.data.model_copy(
        update={"val_fraction": 0.2})}))
    assert dataset_record(other_split.splits)["mean"] != record["mean"]
    _, teachers = pipeline.prepare_distill(load_config(None, [*distill, "data.name=fashion-mnist",
                                                              f"data.root={fashion_like}", "data.val_fraction=0.2"]),
                                           other_split)
    adapted = input_description(teachers.members[0])
    assert adapted["mean"] == pytest.approx(record["mean"]) and adapted["std"] == pytest.approx(record["std"])
    _, same = pipeline.prepare_distill(load_config(None, [*distill, "data.name=fashion-mnist",
                                                          f"data.root={fashion_like}"]), fashion_data)
    assert input_description(same.members[0]) is None


def test_resuming_on_other_data_is_refused(tmp_path):
    from ensemble_kd.engine import CheckpointError
    from ensemble_kd.engine.checkpoint import atomic_save

    trainer = _digits_trainer(tmp_path)
    state = trainer.state_dict()
    state["data"] = {"name": "fashion-mnist", "classes": ["T-shirt/top"] * 10, "image_size": [28, 28], "channels": 1}
    atomic_save(state, tmp_path / "last.pt")
    resumed = _digits_trainer(tmp_path)
    resumed.dataset = {"name": "digits", "classes": [str(i) for i in range(10)], "image_size": [8, 8], "channels": 1}
    with pytest.raises(CheckpointError, match=r"was trained on fashion-mnist \(28x28.*this run's data is digits"):
        resumed.fit(resume=True)
