"""Tests for ensemble_kd.report: table formatting, results files, PNG figures."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from ensemble_kd.metrics import reliability_bins
from ensemble_kd.report import (
    COLUMNS,
    MARK,
    TEMPERATURE_NOTE,
    accuracy_vs_cost,
    load_results,
    markdown_table,
    print_table,
    reliability_diagram,
    write_results,
)
from ensemble_kd.sweep import summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {
        "name": "resnet20",
        "acc": 0.93712,
        "nll": 0.21234567,
        "ece": 0.0123456,
        "params": 272474,
        "macs": 20_500_000,
        "flops": 41_000_000,
        "latency_ms": 1.23456,
        "throughput": 12345.6,
        "train_time_s": 61.26,
    },
    {"name": "ensemble", "acc": 0.95, "nll": 0.17, "ece": 0.01, "cnll": 0.16, "cece": 0.008, "macs": 1.25e9,
     "flops": 2.5e9},
]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_default_columns_order():
    image = [c for c in COLUMNS if c not in ("gap", "map", "hit1", "top5")]  # video metrics, top-5 beside acc
    assert tuple(image[:6]) == ("name", "acc", "nll", "ece", "cnll", "cece")
    assert COLUMNS.index("gap") < COLUMNS.index("nll") and COLUMNS.index("corr_acc") < COLUMNS.index("params")
    assert {"brier", "params", "flops", "latency_ms", "throughput", "train_time_s"} <= set(COLUMNS)


def test_markdown_table_formats_numbers_and_missing_values():
    cols = ["name", "acc", "nll", "ece", "cnll", "params", "flops", "latency_ms", "throughput", "train_time_s"]
    lines = markdown_table(ROWS, cols).splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert _cells(lines[0])[:3] == ["model", "acc (%)", "NLL"]
    assert _cells(lines[1])[0] == ":---" and set(_cells(lines[1])[1:]) == {"---:"}
    expected = ["resnet20", "93.71", "0.2123", "0.0123", "–", "0.27M", "41.0M", "1.235", "12,346", "61.3"]
    assert _cells(lines[2]) == expected
    # A value the row does not have is an en dash; 2.5e9 FLOPs switch to G.
    assert _cells(lines[3]) == ["ensemble", "95.00", "0.1700", "0.0100", "0.1600", "–", "2.5G", "–", "–", "–"]


def test_markdown_table_default_columns_skip_empty_ones_and_show_spread():
    rows = [{"name": "a|b", "acc": 0.9, "acc_std": 0.0012, "nll": float("nan"), "brier": None}]
    lines = markdown_table(rows).splitlines()
    assert _cells(lines[0]) == ["model", "acc (%)"]  # nll/brier are NaN/None in every row: no column
    assert "90.00 ± 0.12" in lines[2]
    assert "a\\|b" in lines[2]  # a pipe in a name does not break the table
    with pytest.raises(ValueError, match="row 0"):
        markdown_table(["not a dict"])


def test_results_md_keeps_the_top5_column_that_the_printed_table_shows(tmp_path):
    # the commands print top-5 (cli.EVAL_COLUMNS); results.md used to drop it (not in COLUMNS)
    rows = [{"name": "m", "acc": 0.7, "top5": 0.99, "nll": 0.9}]
    write_results(tmp_path, rows)
    header = _cells((tmp_path / "results.md").read_text().splitlines()[0])
    assert header == ["model", "acc (%)", "top-5 (%)", "NLL"]


def test_print_table_renders_to_given_console():
    buf = io.StringIO()
    print_table(ROWS, ["name", "acc", "params"], title="CIFAR-10", console=Console(file=buf, width=120))
    out = buf.getvalue()
    assert "CIFAR-10" in out and "resnet20" in out and "93.71" in out and "0.27M" in out and "–" in out


def test_write_and_load_results_round_trip(tmp_path):
    rows = [dict(ROWS[0], temperature=torch.tensor(1.5), seed=3, missing=float("nan"))]
    md_path, json_path = write_results(tmp_path / "run", rows)
    assert md_path.name == "results.md" and json_path.name == "results.json"
    assert "93.71" in md_path.read_text() and "0.27M" in md_path.read_text()
    raw = json.loads(json_path.read_text())  # strict JSON: NaN is written as null
    assert raw[0]["acc"] == 0.93712 and raw[0]["params"] == 272474
    loaded = load_results(tmp_path / "run")
    assert loaded[0]["nll"] == 0.21234567  # raw numbers, not the formatted text
    assert loaded[0]["temperature"] == 1.5 and loaded[0]["seed"] == 3 and loaded[0]["missing"] is None
    with pytest.raises(ValueError, match="row 0.bad"):
        write_results(tmp_path / "bad", [{"name": "x", "bad": object()}])


def test_results_written_before_macs_read_back_with_macs(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps([{"name": "old", "acc": 0.9, "flops": 82_000_000},
                                                       {"name": "ensemble", "acc": 0.95}]))
    old, other = load_results(tmp_path)
    assert old["macs"] == 41_000_000 and old["flops"] == 82_000_000  # FLOPs were 2 per multiply-accumulate
    assert "macs" not in other
    assert "MACs" in markdown_table([old])


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="list of row objects"):
        load_results(tmp_path)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000


def _bins(sharpness: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(500, 10, generator=gen), dim=1)
    labels = torch.multinomial(torch.softmax(torch.randn(500, 10, generator=gen), dim=1), 1, generator=gen)
    return reliability_bins(probs, labels.squeeze(1))


def test_reliability_diagram_writes_png(tmp_path):
    path = reliability_diagram({"teacher": _bins(2.0, 0), "student": _bins(4.0, 1)}, tmp_path / "figs" / "rel.png")
    assert path == tmp_path / "figs" / "rel.png"
    _assert_png(path)
    with pytest.raises(ValueError, match="empty"):
        reliability_diagram({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="reliability_bins"):
        reliability_diagram({"m": {"edges": [0, 1]}}, tmp_path / "x.png")


def test_accuracy_vs_cost_writes_png(tmp_path):
    rows = [*ROWS, {"name": "no cost", "acc": 0.5}]  # rows lacking the cost are skipped
    _assert_png(accuracy_vs_cost(rows, tmp_path / "acc_macs.png"))
    _assert_png(accuracy_vs_cost(ROWS, tmp_path / "acc_latency.png", cost="latency_ms"))
    with pytest.raises(ValueError, match="'params'"):
        accuracy_vs_cost([{"name": "a", "acc": 0.9}], tmp_path / "none.png", cost="params")


def test_plots_module_leaves_pyplot_alone():
    code = (
        "import sys, ensemble_kd.report.plots as p, tempfile, os\n"
        "d = tempfile.mkdtemp()\n"
        "p.accuracy_vs_cost([{'name': 'a', 'acc': 0.9, 'macs': 1e6}], os.path.join(d, 'a.png'))\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_latency_cell_shows_median_and_half_the_interquartile_range():
    row = {"name": "m", "latency_ms": 1.1043, "latency_ms_iqr": 0.062}
    assert _cells(markdown_table([row], ["name", "latency_ms"]).splitlines()[2]) == ["m", "1.104 ± 0.031"]
    # A sweep's spread over seeds, where there is one, is what the table shows.
    row["latency_ms_std"] = 0.5
    assert _cells(markdown_table([row], ["name", "latency_ms"]).splitlines()[2]) == ["m", "1.104 ± 0.500"]


# Two rows whose temperature fit stopped at a bound (one with a sweep's spread), two whose did not.
CALIBRATION_ROWS = [
    {"name": "teacher", "acc": 0.98, "cnll": 0.0612, "cece": 0.0101, "temperature": 1.3,
     "temperature_at_bound": False},
    {"name": "student aver", "acc": 0.97, "cnll": 0.6021, "cece": 0.0233, "temperature": 0.01,
     "temperature_at_bound": True},
    {"name": "student aekd", "acc": 0.96, "cnll": 0.5, "cnll_std": 0.1, "cece": 0.02, "temperature_at_bound": True},
    {"name": "no validation", "acc": 0.95},
]


def test_calibrated_cells_at_a_temperature_bound_are_marked_with_one_footnote():
    lines = markdown_table(CALIBRATION_ROWS, ["name", "acc", "cnll", "cece", "temperature"]).splitlines()
    assert _cells(lines[2]) == ["teacher", "98.00", "0.0612", "0.0101", "1.300"]
    assert _cells(lines[3]) == ["student aver", "97.00", f"0.6021{MARK}", f"0.0233{MARK}", "0.010"]
    assert _cells(lines[4]) == ["student aekd", "96.00", f"0.5000 ± 0.1000{MARK}", f"0.0200{MARK}", "–"]
    assert _cells(lines[5]) == ["no validation", "95.00", "–", "–", "–"]
    # After a blank line (a text line right under a table would be one of its rows), once.
    assert lines[6:] == ["", f"{MARK} {TEMPERATURE_NOTE}"]
    assert "T=0.01" in TEMPERATURE_NOTE and "data.val_fraction" in TEMPERATURE_NOTE
    assert sum(line.count(MARK) for line in lines) == 5


def test_tables_without_a_marked_cell_have_no_footnote():
    unflagged = [CALIBRATION_ROWS[0], CALIBRATION_ROWS[3]]
    assert MARK not in markdown_table(unflagged) and TEMPERATURE_NOTE not in markdown_table(unflagged)
    # A flagged row whose calibrated figures are not shown marks nothing.
    assert MARK not in markdown_table(CALIBRATION_ROWS, ["name", "acc", "temperature"])
    buf = io.StringIO()
    print_table(unflagged, ["name", "cnll"], console=Console(file=buf, width=120))
    assert MARK not in buf.getvalue()


def test_printed_table_marks_the_same_cells_and_prints_the_footnote_once():
    buf = io.StringIO()
    print_table(CALIBRATION_ROWS, ["name", "cnll", "cece"], console=Console(file=buf, width=120))
    out = buf.getvalue()
    assert f"0.6021{MARK}" in out and f"0.0233{MARK}" in out and f"0.0612{MARK}" not in out
    assert out.count(TEMPERATURE_NOTE) == 1 and out.rstrip().endswith(TEMPERATURE_NOTE)


def test_results_keep_the_flag_and_old_results_get_it_from_their_temperature(tmp_path):
    md_path, _ = write_results(tmp_path / "run", CALIBRATION_ROWS[:2])
    assert TEMPERATURE_NOTE in md_path.read_text()
    assert [r["temperature_at_bound"] for r in load_results(tmp_path / "run")] == [False, True]
    # results.json written before the flag existed: a temperature at a bound is one
    (tmp_path / "results.json").write_text(json.dumps([{"name": "a", "cnll": 0.6, "temperature": 0.01},
                                                       {"name": "b", "cnll": 0.1, "temperature": 0.7},
                                                       {"name": "c", "acc": 0.9}]))
    assert [r.get("temperature_at_bound") for r in load_results(tmp_path)] == [True, False, None]


def test_a_sweep_row_is_flagged_when_any_seed_is():
    seeds = [{"name": "x", "cnll": 0.1, "temperature_at_bound": False},
             {"name": "x", "cnll": 0.7, "temperature_at_bound": True}]
    assert summarise("aver", seeds)["temperature_at_bound"] is True
    assert summarise("aver", [seeds[0], seeds[0]])["temperature_at_bound"] is False
