"""The benchmark scripts still run (the timings themselves are read on a GPU, never asserted here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ensemble_kd.methods import METHODS

sys.path.insert(0, str(Path(__file__).parent))
from _scripts import load_script  # noqa: E402


def _load(name: str):
    return load_script("benchmarks", name)


def test_throughput_prints_a_row_per_method_beside_the_naive_loop(capsys):
    throughput = _load("throughput")
    assert throughput.main(["--device", "cpu", "--teacher-arch", "small_cnn", "--student-arch", "small_cnn",
                            "--batch", "8", "--image", "8", "--teachers", "2", "--iters", "1", "--warmup", "1",
                            "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| 2 |")]
    names = [line.split("|")[2].strip() for line in table]
    expected = ["naive fp32 loop", "aver online", "aver cached"]
    for m in sorted(METHODS):
        if m not in ("ce", "aver", "kd"):
            expected += [f"{m} online"] + (["aekd online, device solve"] if m == "aekd" else [])
    assert names == expected
    ratios = [float(line.split("|")[4]) for line in table]
    assert ratios[0] == pytest.approx(1.0) and all(r > 0 for r in ratios)


def test_throughput_rounds_interleave_the_rows_and_ratios_pair_rows_of_one_round():
    throughput = _load("throughput")
    calls = []
    steps = [lambda name=name: calls.append(name) for name in "ABC"]
    rates = throughput.interleaved_rates(steps, 4, torch.device("cpu"), warmup=1, iters=1, rounds=2)
    assert calls == list("ABC") + list("ABCABC") and len(rates) == 2 and len(rates[0]) == 3
    # per-round ratios: 2/1 = 2 and 6/2 = 3 (a slow round slows both rows alike)
    assert throughput.ratio_stats([[1.0, 2.0], [2.0, 6.0]], 1, 0) == (2.5, 2.0, 3.0)


def test_loader_benchmark_prints_our_row_beside_torchvisions(capsys, tmp_path):
    pytest.importorskip("torchvision")
    loader = _load("loader")
    assert loader.main(["--images", "24", "--size", "16", "--min-px", "20", "--max-px", "40", "--workers", "0",
                        "--batch", "4", "--batches", "2", "--rounds", "1", "--dir", str(tmp_path),
                        "--decoders", "pil,pil+draft"]) == 0
    out = capsys.readouterr().out.splitlines()
    kinds = ["ours pil", "ours pil+draft", "torchvision"]
    one_worker = [line.split("|") for line in out if line.startswith(("| ours", "| torchvision |"))]
    assert [r[1].strip() for r in one_worker] == kinds and all(float(r[2].split("±")[0]) > 0 for r in one_worker)
    rows = [line.split("|") for line in out if line.startswith("| 24 |")]
    assert [r[2].strip() for r in rows] == kinds
    assert all(float(r[5].split("±")[0]) > 0 for r in rows[:2])  # the ratios of images/s


def test_step_host_benchmark_prints_the_lookup_beside_the_shipped_rows_per_loader(capsys):
    step_host = _load("step_host")
    assert step_host.main(["--samples", "64", "--classes", "10", "--batch", "8", "--steps", "2", "--warmup", "1",
                           "--rounds", "1", "--workers", "0", "--size", "8", "--device-step-ms", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("in-memory", "streamed"))]
    assert [r[:2] for r in rows if len(r) > 3 and r[1] in ("lookup", "shipped")] == [
        ["in-memory", "lookup"], ["in-memory", "shipped"], ["streamed", "lookup"], ["streamed", "shipped"]]
