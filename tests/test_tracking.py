"""logging.tensorboard / logging.mlflow: the trackers hold exactly what metrics.jsonl holds (read back from
the event files and the MLflow store), through a gap a kill leaves, a rewind and a SIGKILLed, resumed run;
the resolved config and the final table are logged too."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ensemble_kd.cli import main
from ensemble_kd.config import ConfigError, load_config
from ensemble_kd.engine import tracking
from ensemble_kd.engine.runs import MetricsLog, write_config

pytest.importorskip("tensorboard", reason="logging.tensorboard needs the 'tensorboard' extra: "
                                          "pip install 'ensemble-kd[tensorboard]'")
pytest.importorskip("mlflow", reason="logging.mlflow needs the 'mlflow' extra: pip install 'ensemble-kd[mlflow]'")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One local store for the module: MLflow builds its tables once (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _no_tracking_left_on():
    yield
    tracking.close()


def _logging(uri: str, experiment: str) -> list[str]:
    return ["logging.tensorboard=true", f"logging.mlflow={{uri: '{uri}', experiment: {experiment}}}"]


def _expected(records: list[dict]) -> list[tuple[str, int, float]]:
    """What a tracker must hold for these records, by hand: each number under <kind>/<key> at the record's
    step, a non-finite one (null, listed in `nonfinite`) as NaN."""
    out = []
    for r in records:
        for key, value in r.items():
            if key in ("kind", "step", "nonfinite"):
                continue
            if value is None and key in r.get("nonfinite", ()):
                value = math.nan
            if isinstance(value, (int, float)):
                out.append((f"{r['kind']}/{key}", r["step"], float(value)))
    return sorted(out, key=lambda t: (t[0], t[1]))


def _events(folder: Path) -> list[tuple[str, int, object]]:
    """Every summary value in every event file of `folder`, raw: a duplicate would show as two."""
    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                value = tensor_util.make_ndarray(v.tensor)
                out.append((v.tag, event.step, value.item() if value.dtype.kind == "f" else value))
    return sorted(out, key=lambda t: (t[0], t[1]))


def _same(got, want) -> None:
    assert [(t, s) for t, s, _ in got] == [(t, s) for t, s, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)  # event files hold float32


def _mlflow_history(client, run_id: str) -> list[tuple[str, int, float]]:
    keys = client.get_run(run_id).data.metrics
    return sorted(((k, m.step, m.value) for k in keys for m in client.get_metric_history(run_id, k)),
                  key=lambda t: (t[0], t[1]))


def _check_mirrors(run: Path, log: Path, uri: str) -> None:
    """The event folder and the MLflow child run of `log` hold exactly metrics.jsonl's records."""
    want = _expected(MetricsLog(log).read())
    assert want
    name = log.parent.relative_to(run).as_posix()
    _same(_events(run / "tensorboard" / name / "metrics"), want)
    ids = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(uri)
    child = client.get_run(ids["children"][name])
    assert child.data.tags["mlflow.parentRunId"] == ids["run_id"]
    _same(_mlflow_history(client, ids["children"][name]), want)
    # one live child run per log: the ones a resume replaced are deleted, not left beside it
    live = client.search_runs([ids["experiment_id"]], f"tags.mlflow.parentRunId = '{ids['run_id']}'")
    assert sorted(r.info.run_name for r in live) == sorted(ids["children"])


def test_a_log_is_mirrored_exactly_through_a_kill_a_resume_and_a_rewind(tmp_path, mlflow_uri):
    config = load_config(None, _logging(mlflow_uri, "unit"))
    run = tmp_path / "run"
    write_config(run, config, "distill")
    log = MetricsLog(run / "student" / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"kind": "step", "step": step, "epoch": step / 4, "loss": 1.0 / step})
    log.write({"kind": "epoch", "epoch": 1, "step": 4, "val_acc": 0.5, "train_loss": float("nan")})
    _check_mirrors(run, log.path, mlflow_uri)
    parent = json.loads((run / "mlflow.json").read_text())["run_id"]
    tracking.close("KILLED")

    log.write({"kind": "step", "step": 5, "epoch": 1.25, "loss": 0.1})  # in the file, never in the trackers
    write_config(run, config, "distill")  # the resumed process
    log.write({"kind": "step", "step": 6, "epoch": 1.5, "loss": 0.05})  # its first write brings step 5 too
    _check_mirrors(run, log.path, mlflow_uri)
    log.rewind(lambda r: r["step"] <= 4)  # back to the checkpoint: steps 5 and 6 leave the trackers too
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 4]
    _check_mirrors(run, log.path, mlflow_uri)
    log.write({"kind": "step", "step": 5, "epoch": 1.25, "loss": 0.2})  # logged again, with its new value
    _check_mirrors(run, log.path, mlflow_uri)
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == parent  # the same MLflow run continued


def test_a_sigkilled_and_resumed_run_is_mirrored_exactly_with_its_config_and_table(tmp_path, mlflow_uri):
    run = tmp_path / "t"
    argv = ["train-teachers", f"run.dir={tmp_path}", "run.name=t", "device=cpu", "teachers.count=1",
            "teachers.train.epochs=12", "teachers.train.log_every=1", "teachers.kwargs={width: 0.25}",
            "data.batch_size=256", "eval.latency=false", *_logging(mlflow_uri, "e2e")]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "ensemble_kd.cli", *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while killed.poll() is None and time.monotonic() < deadline:
            logs = list(run.glob("members/*/metrics.jsonl"))
            kinds = [r["kind"] for r in MetricsLog(logs[0]).read()] if logs else []
            if kinds.count("epoch") >= 2 and kinds[-1] == "step":  # mid-epoch: records past the checkpoint
                break
            time.sleep(0.02)
        assert killed.poll() is None, "the run ended before it could be killed"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    (log,) = run.glob("members/*/metrics.jsonl")
    assert main(["train-teachers", "--resume", str(run)]) == 0
    records = MetricsLog(log).read()
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(range(1, 13))
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # the file itself repeats no step
    _check_mirrors(run, log, mlflow_uri)

    ids = json.loads((run / "mlflow.json").read_text())
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(ids["run_id"])
    assert parent.info.status == "FINISHED"
    beside = (Path(mlflow_uri[len("sqlite:///"):]).parent / "mlruns").as_uri()  # not in the working directory
    assert client.get_experiment(ids["experiment_id"]).artifact_location == beside
    # the config: MLflow's params and config.yaml, TensorBoard's text, equal to the run's config.yaml
    on_disk = yaml.safe_load((run / "config.yaml").read_text())
    assert parent.data.params["teachers.train.epochs"] == "12" and parent.data.params["data.batch_size"] == "256"
    client.download_artifacts(ids["run_id"], "config.yaml", str(tmp_path))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == on_disk
    ((tag, _, text),) = _events(run / "tensorboard" / "run" / "config")
    assert tag == "config/text_summary" and yaml.safe_load(text.item().decode()) == on_disk
    # the final table: results.md as text and artifact, every number of results.json as a metric
    rows = json.loads((run / "results.json").read_text())
    table = {(f"{r['name']}/{k}".replace("(", "_").replace(")", "_").replace("=", "_"), v) for r in rows
             for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert any(name.startswith("ensemble _M_1_/") for name, _ in table)
    results = client.get_run(ids["children"]["run/results"]).data.metrics
    assert results == pytest.approx(dict(table))
    events = _events(run / "tensorboard" / "run" / "results")
    assert {t[len("results/"):]: v for t, _, v in events if t != "results/text_summary"} == \
        pytest.approx(dict(table), rel=1e-6)
    assert len(events) == len(table) + 1
    ((text,),) = [v for t, _, v in events if t == "results/text_summary"]
    assert text.decode() == (run / "results.md").read_text()
    client.download_artifacts(ids["run_id"], "results.md", str(tmp_path))
    assert (tmp_path / "results.md").read_text() == (run / "results.md").read_text()


def test_tracking_is_off_by_default_and_only_rank_0_tracks(tmp_path, monkeypatch):
    write_config(tmp_path / "off", load_config(None, []), "distill")
    MetricsLog(tmp_path / "off" / "metrics.jsonl").write({"kind": "step", "step": 1, "loss": 1.0})
    assert tracking.active() is None and not (tmp_path / "off" / "tensorboard").exists()

    from ensemble_kd import distributed
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=1, size=2))
    write_config(tmp_path / "rank1", load_config(None, ["logging.tensorboard=true"]), "distill")
    assert tracking.active() is None and not (tmp_path / "rank1").exists()


@pytest.mark.parametrize("key, extra", [("logging.tensorboard=true", "tensorboard"),
                                        ("logging.mlflow={experiment: x}", "mlflow")])
def test_a_missing_tracker_package_is_one_sentence_naming_the_extra(key, extra, tmp_path, monkeypatch, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else find_spec(name, *a))
    with pytest.raises(ConfigError, match=rf"needs the '{extra}' package; install it with pip install "
                                          rf"'ensemble-kd\[{extra}\]'"):
        load_config(None, [key])
    assert main(["distill", f"run.dir={tmp_path}", "run.name=r", key]) == 2
    assert f"ensemble-kd[{extra}]" in capsys.readouterr().err and not (tmp_path / "r").exists()
