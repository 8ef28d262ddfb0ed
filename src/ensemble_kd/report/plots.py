"""Figures: reliability diagrams and accuracy against cost, written as PNG files.

Figures are built with matplotlib.figure.Figure on an Agg canvas, never pyplot, so
the global backend and any interactive session of the user are left untouched.
matplotlib is imported when a figure is drawn, not when the package is.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..metrics.calibration import ece_from_bins
from .layout import GAPS, place_labels
from .tables import HEADERS

DPI = 120
_COST_LABELS = {
    "macs": "MACs per sample",
    "flops": "FLOPs per sample",
    "params": "parameters",
    "latency_ms": "latency at batch 1 (ms)",
    "throughput": "throughput (images/s)",
    "train_time_s": "training time (s)",
}
_TITLE_CHARS = 34  # per title line of a 3-inch panel at 9 pt
_KEY_CHARS = 64  # per entry of accuracy_vs_cost's key
_KEY_FONT, _LABEL_FONT = 7.5, 7.5
_MARKER_POINTS = 5.0
_MARKER_PX = _MARKER_POINTS / 2 * DPI / 72 + 1  # half-side of the square a label keeps clear of


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)  # attaches itself to the figure
    return fig


def _save(fig, path: str | Path) -> Path:
    from ..engine.checkpoint import atomic_write  # a full disk names the figure; a half-written one never stays

    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return path


def si_tick(x: float, _pos=None) -> str:
    """Tick text for counts: 2M, 500K, 1.5G; plain below a thousand (0.5, 20)."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def _check_bins(bins: Mapping[str, Any], name: str) -> None:
    missing = [k for k in ("edges", "confidence", "accuracy", "count") if k not in bins]
    if missing:
        raise ValueError(f"bins for {name!r} lack {missing}; pass the dict returned by reliability_bins.")
    if sum(bins["count"]) == 0:
        raise ValueError(f"bins for {name!r} hold no samples; compute them on a non-empty set.")


def wrap_title(name: str, width: int = _TITLE_CHARS, lines: int = 3) -> str:
    """The name on at most `lines` lines of `width` characters, ending in '…' when cut."""
    return "\n".join(textwrap.wrap(name, width, max_lines=lines, placeholder="…")) or name


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def reliability_diagram(bins_by_name: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Write reliability_figure(bins_by_name) as a PNG."""
    return _save(reliability_figure(bins_by_name), path)


def reliability_figure(bins_by_name: Mapping[str, Mapping[str, Any]]):
    """One panel per model: accuracy per confidence bin as bars (fainter the fewer samples), the gap
    to the bin's mean confidence hatched, the diagonal of perfect calibration, the ECE in the title,
    and under it the bin's sample count (log scale, the count written on each bar)."""
    if not bins_by_name:
        raise ValueError("bins_by_name is empty; pass {model name: reliability_bins(...)} for at least one model.")
    for name, bins in bins_by_name.items():
        _check_bins(bins, name)
    n = len(bins_by_name)
    ncols = min(n, max(4, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    titles = [f"{wrap_title(name)}\nECE = {ece_from_bins(dict(bins)):.4f}" for name, bins in bins_by_name.items()]
    # Fixed geometry in inches (no layout engine: it cost seconds per figure): every panel is a cell
    # of the same size, its title given room for the longest title's lines.
    title = 0.16 * max(t.count("\n") + 1 for t in titles) + 0.12
    left, width, right, diagram, between, hist, bottom = 0.55, 2.3, 0.15, 2.2, 0.08, 0.65, 0.45
    cell_w, cell_h = left + width + right, title + diagram + between + hist + bottom
    fig = _figure(cell_w * ncols, cell_h * nrows, layout=None)
    W, H = cell_w * ncols, cell_h * nrows
    for i, ((name, bins), text) in enumerate(zip(bins_by_name.items(), titles)):
        row, col = divmod(i, ncols)
        x0, y_top = col * cell_w + left, H - row * cell_h - title
        ax = fig.add_axes((x0 / W, (y_top - diagram) / H, width / W, diagram / H))
        hist_ax = fig.add_axes((x0 / W, (y_top - diagram - between - hist) / H, width / W, hist / H), sharex=ax)
        _reliability_panel(ax, hist_ax, bins, text, first_col=col == 0)
        if i == 0:
            ax.legend(loc="upper left", fontsize="x-small")
    return fig


def _reliability_panel(ax, hist, bins: Mapping[str, Any], title: str, first_col: bool) -> None:
    edges, counts = list(bins["edges"]), list(bins["count"])
    full = [i for i, c in enumerate(counts) if c > 0]  # empty bins carry no information: nothing drawn
    lefts = [edges[i] for i in full]
    widths = [edges[i + 1] - edges[i] for i in full]
    acc = [bins["accuracy"][i] for i in full]
    gap = [bins["confidence"][i] - bins["accuracy"][i] for i in full]
    top = max(counts)
    # Opacity grows with the bin's share of the largest bin: a 1-sample bar is faint beside a 400-sample one.
    alphas = [0.2 + 0.8 * math.sqrt(counts[i] / top) for i in full]
    bars = ax.bar(lefts, acc, width=widths, align="edge", color="tab:blue", edgecolor="black", lw=0.5,
                  label="accuracy")
    for bar, alpha in zip(bars, alphas):
        bar.set_alpha(alpha)
    ax.bar(lefts, gap, bottom=acc, width=widths, align="edge", color="tab:red", alpha=0.3,
           hatch="//", edgecolor="tab:red", lw=0.5, label="gap to confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xticks=[0, 0.25, 0.5, 0.75, 1], yticks=[0, 0.25, 0.5, 0.75, 1])
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelbottom=False, labelsize=7)
    hist.bar(lefts, [counts[i] for i in full], width=widths, align="edge", color="gray", edgecolor="black", lw=0.5)
    hist.set_yscale("log")
    hist.set_ylim(0.7, top * 40)  # room for the count above the tallest bar
    for left, w, i in zip(lefts, widths, full):
        hist.text(left + w / 2, counts[i] * 1.25, str(counts[i]), ha="center", va="bottom", fontsize=5.5,
                  rotation=90)
    hist.set_xlabel("confidence", fontsize=8)
    hist.tick_params(labelsize=7)
    from matplotlib.ticker import FuncFormatter, LogLocator

    hist.yaxis.set_major_locator(LogLocator(base=10, numticks=4))
    hist.yaxis.set_major_formatter(FuncFormatter(si_tick))
    if first_col:
        ax.set_ylabel("accuracy", fontsize=8)
        hist.set_ylabel("count", fontsize=8)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _cost_points(rows: Iterable[Mapping[str, Any]], cost: str) -> list[tuple[float, float, float, str]]:
    points = []
    for row in rows:
        x, y = _number(row.get(cost)), _number(row.get("acc"))
        if x is not None and y is not None and x > 0:
            std = _number(row.get("acc_std")) or 0.0
            points.append((x, 100 * y, 100 * std, str(row.get("name", ""))))
    if not points:
        raise ValueError(f"no row has both 'acc' and a positive {cost!r}; compute the cost or choose another column.")
    return points


def accuracy_vs_cost(rows: Iterable[Mapping[str, Any]], path: str | Path, cost: str = "macs") -> Path:
    """Write accuracy_vs_cost_figure(rows, cost) as a PNG."""
    return _save(accuracy_vs_cost_figure(rows, cost), path)


def accuracy_vs_cost_figure(rows: Iterable[Mapping[str, Any]], cost: str = "macs"):
    """Scatter of test accuracy (%) against a cost column (log x); rows lacking either value are
    skipped, `acc_std` becomes an error bar. Points are labelled with their names where these fit
    without covering each other; otherwise numbered, with a key under the plot. Rows at the same
    cost and the same shown accuracy (2 decimals) share one point and one label."""
    points = _cost_points(rows, cost)
    fig, labelled = _cost_figure(points, cost, numbered=False)
    if not labelled:
        fig, _ = _cost_figure(points, cost, numbered=True)
    return fig


def _cost_figure(points, cost: str, numbered: bool):
    """The figure and whether every label found a clear place."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, (x, y, _, _) in enumerate(points):
        groups.setdefault((x, round(y, 2)), []).append(i)
    if numbered:
        labels = [",".join(str(i + 1) for i in members) for members in groups.values()]
        key = [_cut(f"{i + 1}  {p[3]}", _KEY_CHARS) for i, p in enumerate(points)]
    else:
        labels = ["\n".join(points[i][3] for i in members) for members in groups.values()]
        key = []
    key_cols = 1 if len(key) <= 16 else 2
    key_rows = math.ceil(len(key) / key_cols)
    columns = ["\n".join(key[c * key_rows:(c + 1) * key_rows]) for c in range(key_cols)]
    key_inches = 0.145 * key_rows + 0.25 if key else 0.0
    fig = _figure(6.5, 4.6 + key_inches)
    widths = [_text_size(fig, column, _KEY_FONT)[0] / DPI + 0.25 for column in columns]  # inches
    fig.set_size_inches(max(6.5, sum(widths) + 0.8), 4.6 + key_inches)
    if key:
        grid = fig.add_gridspec(2, 1, height_ratios=[4.6, key_inches])
        ax, key_ax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        key_ax.axis("off")  # a spacer: the key is written in its place once the layout is settled
    else:
        ax, key_ax = fig.add_subplot(), None
    xs, ys, errs, _ = zip(*points)
    ax.errorbar(xs, ys, yerr=errs, fmt="o", ms=_MARKER_POINTS, capsize=3, zorder=3)
    _log_axis(ax, xs)
    ax.set(xlabel=_COST_LABELS.get(cost, HEADERS.get(cost, cost)), ylabel="test accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)
    fig.draw_without_rendering()  # settle the layout: labels are placed in its final pixels
    fig.set_layout_engine("none")
    if key_ax is not None:
        from matplotlib.transforms import IdentityTransform

        x, top = ax.bbox.x0, key_ax.bbox.y1
        for column, width in zip(columns, widths):
            fig.text(x, top, column, transform=IdentityTransform(), va="top", ha="left", fontsize=_KEY_FONT,
                     linespacing=1.35)
            x += width * DPI
    placed = _draw_labels(ax, [(x, y) for x, y in groups], labels)
    return fig, all(placed)


def _text_size(fig, text: str, fontsize: float, linespacing: float = 1.35) -> tuple[float, float]:
    """Width and height in pixels of `text` as the figure would draw it."""
    probe = fig.text(0, 0, text, fontsize=fontsize, linespacing=linespacing)
    box = probe.get_window_extent(fig.canvas.get_renderer())
    probe.remove()
    return box.width, box.height


def _log_axis(ax, xs) -> None:
    """Log x with plain tick text (2M, 5M, 10M), marks at 1-2-5 within two decades, fewer beyond."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = min(xs), max(xs)
    margin = max(0.15, 0.06 * math.log10(hi / lo))  # in decades
    ax.set_xscale("log")
    ax.set_xlim(lo / 10**margin, hi * 10**margin)
    decades = math.log10(hi / lo) + 2 * margin
    subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,) if decades <= 8 else None
    major = LogLocator(base=10, subs=subs) if subs else LogLocator(base=10, numticks=8)
    ax.xaxis.set_major_locator(major)
    ax.xaxis.set_major_formatter(FuncFormatter(si_tick))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _draw_labels(ax, anchors_data, labels: list[str]) -> list[bool]:
    """Place each label by place_labels in the axes' pixels and draw it (a leader line when it is
    not next to its point); a label with no clear place is drawn beside its point anyway."""
    anchors = [tuple(p) for p in ax.transData.transform(anchors_data)]
    sizes = [_text_size(ax.figure, text, _LABEL_FONT, linespacing=1.1) for text in labels]
    b = ax.bbox
    boxes = place_labels(anchors, sizes, (b.x0 + 2, b.y0 + 2, b.x1 - 2, b.y1 - 2), marker=_MARKER_PX)
    points_per_pixel = 72 / ax.figure.dpi
    for point, (x, y), text, box, (w, h) in zip(anchors_data, anchors, labels, boxes, sizes):
        x0, y0 = (box[0], box[1]) if box is not None else (x + _MARKER_PX + GAPS[0], y - h / 2)
        near = box is None or max(box[0] - x, x - box[2], box[1] - y, y - box[3]) <= _MARKER_PX + GAPS[0] + 0.5
        ax.annotate(text, point, fontsize=_LABEL_FONT, linespacing=1.1,
                    xytext=((x0 - x) * points_per_pixel, (y0 - y) * points_per_pixel), textcoords="offset points",
                    ha="left", va="bottom", annotation_clip=False,
                    arrowprops=None if near else {"arrowstyle": "-", "lw": 0.5, "color": "gray",
                                                  "shrinkA": 0, "shrinkB": 3})
    return [box is not None for box in boxes]


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
    fig = _figure(4.5 * cols, 3.2 * rows, layout=None)
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
