"""Sweeps: the same distillation under several variants and student seeds, as one table.

    sweep:
      seeds: [0, 1, 2]
      variants:
        student alone: {method.name: ce}
        AE-KD C=0.6:   {method.name: aekd, method.options.C: 0.6}

Each (variant, seed) is an ordinary distill run in <run>/<variant>/seed<k>, skipped when
its results exist, so a killed sweep continues where it stopped. The table has one row
per variant: the mean over seeds, with the spread (standard deviation) beside it.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from . import pipeline
from .config import Config, ConfigError, validate_config
from .config import apply_override
from . import distributed
from .engine.runs import write_config
from .report import load_results, write_results

SPREAD_KEYS = ("acc", "gap", "map", "hit1", "top5", "corr_acc", "corr_nll", "corr_ece", "ood_auroc_maxprob",
               "ood_auroc_entropy", "nll", "ece", "cnll", "cece", "brier", "train_time_s")


def variant_configs(config: Config) -> list[tuple[str, int, Config]]:
    """Every (variant, seed, config) of the sweep, each config validated before any training."""
    variants = config.sweep.variants or {config.method.name: {}}
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


def run_sweep(config: Config, run_dir: Path, *, progress=None, data=None, only=None) -> list[dict]:
    """Train what is missing and summarise; `only` limits the run to some variants (e.g. to split
    a sweep over processes or machines: a later run without it finds their results)."""
    data = data or pipeline.prepare_data(config)
    runs = variant_configs(config)
    if only:
        unknown = set(only) - {name for name, _, _ in runs}
        if unknown:
            raise ConfigError(f"--only names no sweep variant: {', '.join(sorted(unknown))}")
        runs = [r for r in runs if r[0] in only]
    by_variant: dict[str, list[dict]] = {}
    for name, seed, variant in runs:
        out = run_dir / slug(name) / f"seed{seed}"
        if not (out / "results.json").is_file():
            if _split_key(variant) != _split_key(data.config):  # the variant loads other data
                data = pipeline.prepare_data(variant)
            write_config(out, variant, "distill")
            student, info = pipeline.distill(variant, out, resume=True, progress=progress, data=data)
            if distributed.world().is_main:  # rank 0 evaluates and writes; the others wait for it
                write_results(out, pipeline.evaluate_student(variant, student, data, info))
            distributed.barrier()
        for row in load_results(out):  # LatentBE gives two: collapsed and BE
            label = f"{name} [{row['part']}]" if row.get("part") else name
            by_variant.setdefault(label, []).append(row)
    return [summarise(name, rows) for name, rows in by_variant.items()]


def summarise(name: str, rows: list[dict]) -> dict:
    """Mean of every number over seeds; `<key>_std` the spread where a metric varies."""
    out = {"name": f"{name} ({len(rows)} seeds)" if len(rows) > 1 else name, "seeds": len(rows)}
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
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
