"""Runs mirrored to TensorBoard and MLflow: every metrics.jsonl record, the resolved config, the final table.

One Tracking per command, on rank 0 (write_config starts it, for the command's run directory: every
metrics.jsonl, config and results table under that directory is mirrored). Nothing is lost or logged twice
on --resume because a tracker's copy of a log is never patched: the first time a process writes a log, and
whenever the trainer rewinds it to its checkpoint, the copy is replaced whole by the file's records
(TensorBoard: the log's event folder rewritten; MLflow: the log's child run replaced). Records are written
to metrics.jsonl first and flushed to the trackers at once, so a kill loses at most the record a resume
replays anyway.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

from ..config import Config, LoggingConfig, dump_config
from .checkpoint import atomic_write_text

_active: Tracking | None = None


def start(run_dir: Path, config: Config) -> None:
    """Mirror the run in `run_dir` (and everything under it) to the trackers config.logging turns on;
    a directory inside the tracked one (a demo's teachers, a sweep's runs) only logs its config."""
    global _active
    from ..distributed import world

    if not world().is_main:
        return
    run_dir = Path(run_dir).resolve()
    if _active is not None and _active.name(run_dir) is None:
        close()
    if _active is None:
        if not config.logging.tensorboard and config.logging.mlflow is None:
            return
        _active = Tracking(run_dir, config.logging)
    _active.log_config(run_dir, config)


def close(status: str = "FINISHED") -> None:
    """End the command's tracking (MLflow's run marked `status`); a no-op when none is on."""
    global _active
    if _active is not None:
        tracking, _active = _active, None
        tracking.close(status)


def active() -> Tracking | None:
    return _active


class Tracking:
    def __init__(self, root: Path, cfg: LoggingConfig):
        self.root = root
        self.sinks = []
        if cfg.tensorboard:
            self.sinks.append(TensorBoardSink(root / "tensorboard"))
        if cfg.mlflow is not None:
            self.sinks.append(MlflowSink(root, cfg.mlflow.uri, cfg.mlflow.experiment))
        self.synced: set[str] = set()  # logs whose copies this process has made equal to the file

    def name(self, directory: Path) -> str | None:
        """`directory` relative to the tracked run ('run' for the run itself); None outside it."""
        try:
            rel = Path(directory).resolve().relative_to(self.root)
        except ValueError:
            return None
        return "run" if rel == Path(".") else rel.as_posix()

    def record(self, log_path: Path, record: dict, read_all) -> None:
        """One record appended to `log_path`; `read_all()` gives the file's records for the first sync."""
        name = self.name(log_path.parent)
        if name is None:
            return
        if name not in self.synced:
            self.replace(log_path, read_all())
            return
        for sink in self.sinks:
            sink.append(name, record)

    def replace(self, log_path: Path, records: list[dict]) -> None:
        name = self.name(log_path.parent)
        if name is None:
            return
        for sink in self.sinks:
            sink.replace(name, records)
        self.synced.add(name)

    def log_config(self, run_dir: Path, config: Config) -> None:
        name = self.name(run_dir)
        text = dump_config(config)
        params = _flat(config.model_dump(mode="json")) if name == "run" else {}
        for sink in self.sinks:
            sink.config(name, text, params)

    def log_table(self, run_dir: Path, rows: list[dict], markdown: str) -> None:
        name = self.name(run_dir)
        if name is None:
            return
        for sink in self.sinks:
            sink.table(name, rows, markdown)

    def close(self, status: str) -> None:
        for sink in self.sinks:
            sink.close(status)


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers under `<kind>/<key>` (non-finite ones, written as null, as NaN)."""
    kind = record.get("kind", "step")
    nonfinite = set(record.get("nonfinite", ()))
    out = {}
    for key, value in record.items():
        if key in ("kind", "step", "nonfinite"):
            continue
        if value is None and key in nonfinite:
            value = math.nan
        if isinstance(value, (int, float)):
            out[_safe(f"{kind}/{key}")] = float(value)
    return out


def _safe(name: str) -> str:
    """A name in MLflow's characters (the same tag in TensorBoard): 'ensemble (M=2)' -> 'ensemble _M_2_'."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def table_scalars(rows: list[dict]) -> dict[str, float]:
    """The final table's numbers under `<row name>/<column>`."""
    return {_safe(f"{row.get('name', i)}/{key}"): float(value) for i, row in enumerate(rows) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def _flat(tree, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {_safe(prefix[:-1]): json.dumps(tree) if isinstance(tree, (list, type(None))) else str(tree)}


class TensorBoardSink:
    """Event folders under `base`: <name>/metrics (step = the record's step), <name>/config, <name>/results."""

    def __init__(self, base: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.base, self._writer_class, self.writers = base, SummaryWriter, {}

    def _fresh(self, folder: str):
        """A writer on an emptied folder: what it held is replaced, never added to."""
        if folder in self.writers:
            self.writers.pop(folder).close()
        shutil.rmtree(self.base / folder, ignore_errors=True)
        self.writers[folder] = self._writer_class(str(self.base / folder))
        return self.writers[folder]

    def _write(self, writer, record: dict) -> None:
        for tag, value in scalars(record).items():
            writer.add_scalar(tag, value, global_step=record.get("step", 0))

    def replace(self, name: str, records: list[dict]) -> None:
        writer = self._fresh(f"{name}/metrics")
        for record in records:
            self._write(writer, record)
        writer.flush()

    def append(self, name: str, record: dict) -> None:
        writer = self.writers[f"{name}/metrics"]
        self._write(writer, record)
        writer.flush()

    def config(self, name: str, text: str, params: dict) -> None:
        writer = self._fresh(f"{name}/config")
        writer.add_text("config", "    " + text.replace("\n", "\n    "))  # indented: shown as code
        writer.flush()

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        writer = self._fresh(f"{name}/results")
        writer.add_text("results", markdown)
        for tag, value in table_scalars(rows).items():
            writer.add_scalar(f"results/{tag}", value, global_step=0)
        writer.flush()

    def close(self, status: str) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def _artifacts_beside(uri: str | None) -> str | None:
    """A local database's artifacts in mlruns/ beside it, as MLflow's default ./mlflow.db has ./mlruns
    (MLflow would put them in the working directory); None (MLflow's choice) for any other store."""
    if uri is None or not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()


class MlflowSink:
    """One MLflow run per run directory (its id in mlflow.json there, so --resume continues it): the config
    as params and config.yaml, each log as a child run `<name>`, each table as a child run `<name>/results`
    with results.md/json as the parent's artifacts. A replaced copy deletes the child run it replaces."""

    def __init__(self, root: Path, uri: str | None, experiment: str):
        from mlflow.tracking import MlflowClient

        self.ids_path = root / "mlflow.json"
        ids = json.loads(self.ids_path.read_text()) if self.ids_path.is_file() else {}
        self.client = MlflowClient(tracking_uri=uri)
        if ids and self._exists(ids["run_id"]):
            self.client.update_run(ids["run_id"], status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None else
                             self.client.create_experiment(experiment, artifact_location=_artifacts_beside(uri)))
            run = self.client.create_run(experiment_id, run_name=root.name)
            ids = {"experiment_id": experiment_id, "run_id": run.info.run_id, "children": {}}
            root.mkdir(parents=True, exist_ok=True)
        self.ids = ids
        self._save()

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # deleted from the store, or another store: start a new run
            return False

    def _save(self) -> None:
        atomic_write_text(self.ids_path, json.dumps(self.ids, indent=2) + "\n")

    def _child(self, key: str) -> str:
        """A new child run for `key`, replacing (deleting) the one before it."""
        old = self.ids["children"].get(key)
        if old is not None and self._exists(old):
            self.client.delete_run(old)
        run = self.client.create_run(self.ids["experiment_id"], run_name=key,
                                     tags={"mlflow.parentRunId": self.ids["run_id"]})
        self.ids["children"][key] = run.info.run_id
        self._save()
        return run.info.run_id

    def _log(self, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def _metrics(self, record: dict) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(tag, value, now, record.get("step", 0)) for tag, value in scalars(record).items()]

    def replace(self, name: str, records: list[dict]) -> None:
        run_id = self._child(name)
        self._log(run_id, [m for record in records for m in self._metrics(record)])

    def append(self, name: str, record: dict) -> None:
        self._log(self.ids["children"][name], self._metrics(record))

    def config(self, name: str, text: str, params: dict) -> None:
        from mlflow.entities import Param

        run_id = self.ids["run_id"]
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        self.client.log_text(run_id, text, "config.yaml" if name == "run" else f"{name}/config.yaml")

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        from mlflow.entities import Metric

        run_id = self._child(f"{name}/results")
        self._log(run_id, [Metric(k, v, int(time.time() * 1000), 0) for k, v in table_scalars(rows).items()])
        where = "" if name == "run" else f"{name}/"
        self.client.log_text(self.ids["run_id"], markdown, f"{where}results.md")
        self.client.log_text(self.ids["run_id"], json.dumps(rows, indent=2), f"{where}results.json")

    def close(self, status: str) -> None:
        for run_id in self.ids["children"].values():
            self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.ids["run_id"], status)
