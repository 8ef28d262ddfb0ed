"""Figures: reliability diagrams and accuracy against cost, written as PNG files.

Figures are built with matplotlib.figure.Figure on an Agg canvas, never pyplot, so
the global backend and any interactive session of the user are left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .tables import HEADERS

_COST_LABELS = {
    "flops": "FLOPs per sample",
    "params": "parameters",
    "latency_ms": "latency at batch 1 (ms)",
    "throughput": "throughput (images/s)",
    "train_time_s": "training time (s)",
}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to the figure
    fig.savefig(path, format="png", dpi=120)
    return path


def _bins_ece(bins: Mapping[str, Any], name: str) -> float:
    missing = [k for k in ("edges", "confidence", "accuracy", "count") if k not in bins]
    if missing:
        raise ValueError(f"bins for {name!r} lack {missing}; pass the dict returned by reliability_bins.")
    total = sum(bins["count"])
    if total == 0:
        raise ValueError(f"bins for {name!r} hold no samples; compute them on a non-empty set.")
    pairs = zip(bins["count"], bins["accuracy"], bins["confidence"])
    return sum(n / total * abs(a - c) for n, a, c in pairs)


def reliability_diagram(bins_by_name: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """One panel per model: accuracy per confidence bin as bars, the gap to the bin's mean
    confidence hatched, the diagonal of perfect calibration, and the ECE in the title."""
    if not bins_by_name:
        raise ValueError("bins_by_name is empty; pass {model name: reliability_bins(...)} for at least one model.")
    n = len(bins_by_name)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, bins) in zip(axes.flat, bins_by_name.items()):
        ece = _bins_ece(bins, name)
        edges = list(bins["edges"])
        lefts, widths = edges[:-1], [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
        # Empty bins carry no information: draw nothing for them.
        acc = [a if c > 0 else 0.0 for a, c in zip(bins["accuracy"], bins["count"])]
        conf = [m if c > 0 else 0.0 for m, c in zip(bins["confidence"], bins["count"])]
        ax.bar(lefts, acc, width=widths, align="edge", color="tab:blue", edgecolor="black", lw=0.5, label="accuracy")
        gap = [c - a for a, c in zip(acc, conf)]
        ax.bar(lefts, gap, bottom=acc, width=widths, align="edge", color="tab:red", alpha=0.3,
               hatch="//", edgecolor="tab:red", lw=0.5, label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name}\nECE = {ece:.4f}")
    axes.flat[0].legend(loc="upper left", fontsize="small")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return _save(fig, path)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def accuracy_vs_cost(rows: Iterable[Mapping[str, Any]], path: str | Path, cost: str = "flops") -> Path:
    """Scatter of test accuracy (%) against a cost column (log x), each point labelled with
    its row's name; rows lacking either value are skipped; `acc_std` becomes an error bar."""
    points = []
    for row in rows:
        x, y = _number(row.get(cost)), _number(row.get("acc"))
        if x is not None and y is not None and x > 0:
            std = _number(row.get("acc_std")) or 0.0
            points.append((x, 100 * y, 100 * std, str(row.get("name", ""))))
    if not points:
        raise ValueError(f"no row has both 'acc' and a positive {cost!r}; compute the cost or choose another column.")
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    xs, ys, errs, names = zip(*points)
    ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3)
    for x, y, name in zip(xs, ys, names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xscale("log")
    ax.set(xlabel=_COST_LABELS.get(cost, HEADERS.get(cost, cost)), ylabel="test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def teacher_weights_over_training(records_by_run: Mapping[str, list[Mapping[str, Any]]], path: str | Path,
                                  prefix: str = "alpha_") -> Path:
    """One panel per run: each teacher's weight (AE-KD's alpha_i) against the training step."""
    series = {}
    for run, records in records_by_run.items():
        steps = [r for r in records if "step" in r and any(k.startswith(prefix) for k in r)]
        keys = sorted({k for r in steps for k in r if k.startswith(prefix)}, key=lambda k: int(k[len(prefix):]))
        if steps:
            series[run] = (steps, keys)
    if not series:
        raise ValueError(f"no step records with '{prefix}*' weights to plot")
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    for i, (run, (steps, keys)) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        x = [r["step"] for r in steps]
        for key in keys:
            ax.plot(x, [r.get(key, float("nan")) for r in steps], label=f"teacher {key[len(prefix):]}", lw=1)
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)
