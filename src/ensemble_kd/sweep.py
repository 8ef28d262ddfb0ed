"""Sweeps: the same distillation under several variants and student seeds, as one table.

    sweep:
      seeds: [0, 1, 2]
      variants:
        student alone: {method.name: ce}
        AE-KD C=0.6:   {method.name: aekd, method.options.C: 0.6}

Each (variant, seed) is an ordinary distill run in <run>/<variant>/seed<k>. A run found there
is reused (finished) or continued (killed) only when its config and teachers equal the
variant's now; a changed run stops the sweep before any training, unless --overwrite asks to
re-run it. The table has one row per variant: the mean over seeds, with the spread
(standard deviation) beside it.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import pipeline
from .config import Config, ConfigError, folder_name_problem, validate_config
from .config import apply_override
from . import distributed
from .engine import load_model
from .engine.run_dir import (ACCEPT_LISTING, RESUME_SAFE, RunDirError, clear, contents, data_listing, finished,
                             listing_change, locked, run_changes)
from .engine.runs import write_config
from .report import load_results, write_results

# What a finished run's results do not depend on; eval.* changes re-evaluate its model instead.
FINISHED_SAFE = ("device", "*.log_every", "*.checkpoint_every", "run.*", "sweep.*")

# What a sweep writes beside its variants' folders (lower case: folders may not differ from them in case alone).
SWEEP_FILES = ("config.yaml", "fingerprint.json", ".lock", "results.json", "results.md", "reliability.png",
               "accuracy_vs_cost.png", pipeline.TEACHERS_DIR)

SPREAD_KEYS = ("acc", "gap", "map", "hit1", "top5", "corr_acc", "corr_nll", "corr_ece", "ood_auroc_maxprob",
               "ood_auroc_entropy", "nll", "ece", "cnll", "cece", "brier", "train_time_s")


def variant_configs(config: Config) -> list[tuple[str, int, Config]]:
    """Every (variant, seed, config) of the sweep, each config validated before any training."""
    variants = config.sweep.variants or {config.method.name: {}}
    folders: dict[str, str] = {}
    for name in variants:  # "lr 0.05" and "lr/0.05" would train once and report one run twice
        folder = slug(name)
        if folder_name_problem(folder) or folder.lower() in SWEEP_FILES:
            raise ConfigError(f"sweep variant '{name}' would train in the folder '{folder}', which is not one of "
                              f"its own (a dot name, or a file or folder the sweep writes); rename it")
        other = folders.setdefault(folder.lower(), name)
        if other != name:
            raise ConfigError(f"sweep variants '{other}' and '{name}' would share the folder '{slug(name)}'; "
                              f"rename one of them")
    base = config.model_dump(mode="json")
    out = []
    for name, overrides in variants.items():
        for seed in config.sweep.seeds:
            tree = _copy(base)
            for key, value in {**overrides, "student.seed": seed}.items():
                apply_override(tree, key.split("."), value)
            try:
                out.append((name, seed, validate_config(tree)))
            except ConfigError as err:
                raise ConfigError(f"sweep variant '{name}': {err}") from None
    return out


@dataclass
class PlannedRun:
    variant: str
    seed: int
    config: Config
    out: Path
    action: str  # train (new or changed), resume (killed), evaluate (eval.* changed), reuse


def plan_runs(config: Config, run_dir: Path, *, only=None, overwrite: bool = False, listing: dict | None = None,
              accept: bool = False) -> list[PlannedRun]:
    """What each (variant, seed) needs, decided before any training; a changed run is refused
    (naming it and its first changed key) unless `overwrite` asks to train it again. `listing`: the
    streamed training listing now, which a run made on another is refused for unless `accept`."""
    runs = variant_configs(config)
    if only:
        unknown = set(only) - {name for name, _, _ in runs}
        if unknown:
            raise ConfigError(f"--only names no sweep variant: {', '.join(sorted(unknown))}")
        runs = [r for r in runs if r[0] in only]
    plan = []
    for name, seed, variant in runs:
        out, changes = Path(run_dir) / slug(name) / f"seed{seed}", []
        if not contents(out):
            action = "train"
        elif not (out / "config.yaml").is_file():
            changes = ["its config.yaml, which is missing"]
        else:
            done = finished(out)
            changes = run_changes(out, variant, FINISHED_SAFE if done else RESUME_SAFE + ("sweep.*",))
            same_data = _split_key(variant) == _split_key(config)  # `listing` is of the sweep's data
            moved = listing_change(out, listing) if same_data and not accept else None
            changes += [f"training listing ({moved}; or pass {ACCEPT_LISTING} to keep the run)"] if moved else []
            evaluation = [c for c in changes if c.startswith("eval.")]
            changes = [c for c in changes if not c.startswith("eval.")]
            action = ("evaluate" if evaluation else "reuse") if done else "resume"
        if contents(out) and changes:
            if not overwrite:
                raise RunDirError(f"sweep run '{out}' was made with another {changes[0]}; pass --overwrite to "
                                  f"train the runs whose config changed again, or choose another run.name")
            action = "train"
        plan.append(PlannedRun(name, seed, variant, out, action))
    return plan


def run_sweep(config: Config, run_dir: Path, *, progress=None, data=None, only=None,
              overwrite: bool = False, listing: dict | None = None, accept: bool = False) -> list[dict]:
    """Train what is missing and summarise; `only` limits the run to some variants (e.g. to split
    a sweep over processes or machines: a later run without it finds their results)."""
    data = data or pipeline.prepare_data(config)
    by_variant: dict[str, list[dict]] = {}
    # rank 0's plan on every rank: the others must not see rank 0's first writes and plan otherwise
    plan = distributed.broadcast_object(plan_runs(config, run_dir, only=only, overwrite=overwrite, listing=listing,
                                                  accept=accept))
    for run in plan:
        if run.action != "reuse":
            if _split_key(run.config) != _split_key(data.config):  # the variant loads other data
                data = pipeline.prepare_data(run.config)
                listing = data_listing(data.splits.train)
            with locked(run.out):  # a second process on the same sweep waits for no one: it stops
                _train_or_evaluate(run, data, progress, listing)
        for row in load_results(run.out):  # LatentBE gives two: collapsed and BE
            label = f"{run.variant} [{row['part']}]" if row.get("part") else run.variant
            by_variant.setdefault(label, []).append(row)
    return [summarise(name, rows) for name, rows in by_variant.items()]


def _train_or_evaluate(run: PlannedRun, data, progress, listing: dict | None) -> None:
    main = distributed.world().is_main
    if run.action == "train" and main:
        clear(run.out)  # a changed run (--overwrite) starts from nothing
    distributed.barrier()
    if run.action == "evaluate":  # only eval.* changed: the trained model evaluated again, then its config
        if main:
            info = json.loads((run.out / "model.json").read_text())
            student = load_model(run.out / "model.pt", map_location=data.device)
            write_results(run.out, pipeline.evaluate_student(run.config, student, data,
                                                             {"train_time_s": info["train_time_s"]}))
            write_config(run.out, run.config, "distill", listing)
    else:
        write_config(run.out, run.config, "distill", listing)  # what a killed run resumes with
        student, info = pipeline.distill(run.config, run.out, resume=True, progress=progress, data=data)
        if main:  # rank 0 evaluates and writes; the others wait for it
            write_results(run.out, pipeline.evaluate_student(run.config, student, data, info))
    distributed.barrier()


def summarise(name: str, rows: list[dict]) -> dict:
    """Mean of every number over seeds; `<key>_std` the spread where a metric varies; a flag
    (temperature_at_bound) is set when any seed's is, since it taints the mean."""
    out = {"name": f"{name} ({len(rows)} seeds)" if len(rows) > 1 else name, "seeds": len(rows)}
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, bool) for v in values):
            out[key] = any(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.fmean(values)
            if len(values) > 1 and key in SPREAD_KEYS:
                out[f"{key}_std"] = statistics.stdev(values)
    if len(rows) == 1 and rows[0].get("reliability"):
        out["reliability"] = rows[0]["reliability"]
    return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "variant"


def _copy(tree):
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy(v) for v in tree]
    return tree


def _split_key(config: Config) -> tuple:
    d = config.data
    return d.name, d.root, d.val_fraction, d.split_seed, d.eval_batch_size, config.device
