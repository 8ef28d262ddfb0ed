"""benchmarks/gpu_check.py stays ready for a GPU slot: its CPU dry run goes through every section."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _scripts import ROOT, load_script  # noqa: E402


def test_the_cpu_dry_run_runs_every_section_end_to_end():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.startswith("| ")][-5:]
    check = load_script("benchmarks", "gpu_check")
    assert [(name.strip(), status.strip()) for name, status in summary] == [(n, "ok") for n in check.SECTIONS]
    assert "steps: 20, batch 8" in done.stdout  # the real run trained its 20 steps from the cache


def test_a_failing_or_overrunning_section_is_reported_and_the_next_one_runs(tmp_path, capsys):
    check = load_script("benchmarks", "gpu_check")
    assert check.run_section("fails", ["-c", "raise SystemExit(3)"], 30, tmp_path)[0] == "failed (exit 3)"
    assert check.run_section("hangs", ["-c", "import time; time.sleep(30)"], 1, tmp_path)[0].startswith("stopped at")
    out = capsys.readouterr().out
    assert "-- fails: failed (exit 3)" in out and "-- hangs: stopped at its time box (1 s)" in out
