"""Result tables: markdown and rich renderings of metric rows, and results.md/json files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..metrics.temperature import T_MAX, T_MIN, temperature_at_bound

MISSING = "–"  # shown for a missing, None or NaN value

# Calibrated figures of a row whose temperature fit stopped at a bound (temperature_at_bound)
# carry this mark, explained once under the table. A dagger, not '*': a line starting with
# '* ' is a list item in markdown, which would hide the mark of the footnote in results.md.
MARK = "†"
CALIBRATED = ("cnll", "cece")
TEMPERATURE_NOTE = (f"temperature scaling hit a bound of its range: the validation NLL still falls beyond it, so "
                    f"cNLL and cECE are not identifiable; T={T_MIN:g} means every validation sample is classified "
                    f"right with a margin (a larger validation split gives calibrated figures: raise "
                    f"data.val_fraction, or add images to an image folder's own val/), T={T_MAX:g} that the "
                    f"predictions on the validation split are no better than uniform (the model has not learnt)")

# Default column order; a row is a dict keyed by these names (extra keys are allowed).
COLUMNS: tuple[str, ...] = (
    "name", "acc", "gap", "map", "hit1", "top5", "nll", "ece", "cnll", "cece", "brier",
    "corr_acc", "corr_nll", "corr_ece", "ood_auroc_maxprob", "ood_auroc_entropy",
    "params", "params_bn_folded", "macs", "flops", "latency_ms", "throughput", "train_time_s",
)  # fmt: skip

HEADERS: dict[str, str] = {
    "name": "model",
    "acc": "acc (%)",
    "top5": "top-5 (%)",
    "gap": "GAP@20 (%)",
    "map": "mAP (%)",
    "hit1": "hit@1 (%)",
    "nll": "NLL",
    "corr_acc": "corr acc (%)",
    "corr_nll": "corr NLL",
    "corr_ece": "corr ECE",
    "ood_auroc_maxprob": "OOD AUROC maxp",
    "ood_auroc_entropy": "OOD AUROC ent",
    "ece": "ECE",
    "cnll": "cNLL",
    "cece": "cECE",
    "brier": "Brier",
    "temperature": "T",
    "params": "params",
    "params_bn_folded": "params (BN folded)",
    "macs": "MACs",
    "flops": "FLOPs",
    "latency_ms": "latency (ms)",
    "throughput": "img/s",
    "train_time_s": "train (s)",
}


def _si(x: float, decimals: int, small_m: float) -> str:
    """Compact count: G above 1e9, M above `small_m` (so 272474 -> 0.27M), K above 1e3."""
    ax = abs(x)
    if ax >= 1e9:
        return f"{x / 1e9:.{decimals}f}G"
    if ax >= small_m:
        return f"{x / 1e6:.{decimals}f}M"
    if ax >= 1e3:
        return f"{x / 1e3:.1f}K"
    return f"{x:.0f}"


_FORMATS = {
    "acc": lambda x: f"{100 * x:.2f}",
    "top5": lambda x: f"{100 * x:.2f}",
    "gap": lambda x: f"{100 * x:.2f}",
    "map": lambda x: f"{100 * x:.2f}",
    "hit1": lambda x: f"{100 * x:.2f}",
    "nll": lambda x: f"{x:.4f}",
    "corr_acc": lambda x: f"{100 * x:.2f}",
    "corr_nll": lambda x: f"{x:.4f}",
    "corr_ece": lambda x: f"{x:.4f}",
    "ood_auroc_maxprob": lambda x: f"{x:.4f}",
    "ood_auroc_entropy": lambda x: f"{x:.4f}",
    "ece": lambda x: f"{x:.4f}",
    "cnll": lambda x: f"{x:.4f}",
    "cece": lambda x: f"{x:.4f}",
    "brier": lambda x: f"{x:.4f}",
    "temperature": lambda x: f"{x:.3f}",
    "params": lambda x: _si(x, 2, 1e5),
    "params_bn_folded": lambda x: _si(x, 2, 1e5),
    "macs": lambda x: _si(x, 1, 1e6),
    "flops": lambda x: _si(x, 1, 1e6),
    "latency_ms": lambda x: f"{x:.3f}",
    "throughput": lambda x: f"{x:,.0f}",
    "train_time_s": lambda x: f"{x:.1f}",
}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_value(column: str, value: Any) -> str:
    """One cell as text: per-column number format, '–' for missing/None/NaN."""
    if _is_missing(value):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if column in _FORMATS:
        return _FORMATS[column](value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def format_cell(row: Mapping[str, Any], column: str) -> str:
    """A row's cell; a numeric `<column>_std` entry (spread over seeds) is appended as '± std', and
    a timing's `<column>_iqr` (spread over repeats around the median) as '± iqr/2'; a calibrated
    figure whose temperature is at a bound ends in MARK."""
    text = format_value(column, row.get(column))
    std, iqr = row.get(f"{column}_std"), row.get(f"{column}_iqr")
    if text != MISSING and _is_number(std):
        text += " ± " + format_value(column, std)
    elif text != MISSING and _is_number(iqr):
        text += " ± " + format_value(column, iqr / 2)
    return text + MARK if _marked(row, column) else text


def _marked(row: Mapping[str, Any], column: str) -> bool:
    return column in CALIBRATED and row.get("temperature_at_bound") is True and not _is_missing(row.get(column))


def footnotes(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    """The lines under a table: where calibrated figures' temperature was fitted (rows' calibration_split),
    and the meaning of MARK, once, when some shown cell carries it."""
    notes = []
    splits = list(dict.fromkeys(r["calibration_split"] for r in rows if r.get("calibration_split")))
    if splits and any(c in CALIBRATED for c in columns):
        notes.append(f"cNLL and cECE: temperature fitted on {'; '.join(splits)}")
    if any(_marked(r, c) for r in rows for c in columns):
        notes.append(f"{MARK} {TEMPERATURE_NOTE}")
    return notes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_missing(value)


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    """Explicit columns as given; by default the COLUMNS that some row actually has."""
    if columns is not None:
        columns = list(columns)
        if not columns:
            raise ValueError("columns is empty; name at least one column or pass None for the defaults.")
        return columns
    return [c for c in COLUMNS if c == "name" or any(not _is_missing(r.get(c)) for r in rows)]


def _check_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i} is a {type(row).__name__}; each row must be a dict of column -> value.")
    return rows


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of the rows (numbers right-aligned), ending with a newline; its
    footnotes follow after a blank line (a text line right under a table would be one of its rows)."""
    rows = _check_rows(rows)
    cols = _columns(rows, columns)
    header = "| " + " | ".join(HEADERS.get(c, c) for c in cols) + " |"
    rule = "|" + "|".join(":---" if c == "name" else "---:" for c in cols) + "|"
    body = ["| " + " | ".join(format_cell(r, c).replace("|", "\\|") for c in cols) + " |" for r in rows]
    notes = footnotes(rows, cols)
    return "\n".join([header, rule, *body, *(["", "\n\n".join(notes)] if notes else [])]) + "\n"


def print_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
    console=None,
) -> None:
    """Print the rows as a rich Table on `console` (a new rich Console on stdout if None), then
    its footnotes."""
    from rich.console import Console
    from rich.table import Table

    rows = _check_rows(rows)
    cols = _columns(rows, columns)
    table = Table(title=title)
    for c in cols:
        table.add_column(HEADERS.get(c, c), justify="left" if c == "name" else "right")
    for r in rows:
        table.add_row(*(format_cell(r, c) for c in cols))
    console = console or Console()
    console.print(table)
    for note in footnotes(rows, cols):
        console.print(note, markup=False, highlight=False, soft_wrap=True)


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON value: tensors/numpy scalars via .item()/.tolist(), NaN/inf -> null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays/scalars
        return _jsonable(value.tolist(), where)
    kind = type(value).__name__
    raise ValueError(f"{where} holds a {kind}, which cannot be written to JSON; store a number or text.")


def write_results(
    run_dir: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Write run_dir/results.md (formatted table) and run_dir/results.json (raw numbers); return both paths."""
    rows = _check_rows(rows)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = [_jsonable(dict(r), f"row {i}") for i, r in enumerate(rows)]
    # Atomic: a sweep takes an existing results.json to mean "done", so a kill must not leave half of one.
    from ..engine import tracking
    from ..engine.checkpoint import atomic_write_text

    md_path = run_dir / "results.md"
    atomic_write_text(md_path, markdown_table(rows, columns))
    json_path = run_dir / "results.json"
    atomic_write_text(json_path, json.dumps(data, indent=2) + "\n")
    if (tracker := tracking.active()) is not None:  # logging.tensorboard / logging.mlflow
        tracker.log_table(run_dir, data, md_path.read_text())
    return md_path, json_path


def load_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows stored by write_results in run_dir/results.json (missing values come back as None)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the experiment (write_results) first or fix run_dir.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it with write_results.") from err
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a JSON list of row objects; rewrite it with write_results.")
    for row in data:  # results written before MACs were reported: FLOPs were 2 per multiply-accumulate
        if isinstance(row.get("flops"), (int, float)) and "macs" not in row:
            row["macs"] = row["flops"] / 2
        if isinstance(row.get("temperature"), (int, float)) and "temperature_at_bound" not in row:
            row["temperature_at_bound"] = temperature_at_bound(row["temperature"])  # written before the flag
    return data
