"""Everything a short slot on a bare GPU machine should measure, in one run of under 8 minutes.

    sh benchmarks/gpu_wheels.sh          # here: the wheels the GPU machine lacks, into .whl/
    # there, in the repository root (one line):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --cpu-dry-run   # every section end to end on the CPU at tiny sizes (CI)

Sections, each in its own process with its own time box (one that fails or overruns prints why, and
the next one runs):
1. cuda-tests: tests/test_cuda.py (they skip on a CPU);
2. throughput-imagenet: benchmarks/throughput.py, ResNet-50 student, ResNet-101 + ResNet-152 teachers,
   224 px, bf16, synthetic tensors, the naive fp32 loop beside every method in interleaved rounds;
3. loader: benchmarks/loader.py at 224 px, 400-500 px JPEGs, 15 workers, beside torchvision's ImageFolder;
4. real-run: 20 steps of `distill` from a real teacher cache over a generated image folder, under
   torch.cuda.set_sync_debug_mode("warn"): forced syncs inside and outside the step, time per step,
   peak GPU memory;
5. throughput-cifar: the figures BENCHMARKS.md asks for (ResNet-56 teachers, ResNet-20 student, M = 5
   and 10, batch 1024).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STEPS = 20  # the real run's steps

# name -> (GPU argv, time box in s, dry-run argv); argv run with this Python, from the repository root
THROUGHPUT_DRY = ["--device", "cpu", "--student-arch", "small_cnn", "--batch", "8", "--image", "8",
                  "--teachers", "2", "--iters", "1", "--warmup", "1", "--rounds", "1"]
SECTIONS = {
    "cuda-tests": (["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"], 120,
                   ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"]),
    "throughput-imagenet": ([str(BENCH / "throughput.py"), "--device", "cuda", "--student-arch", "torchvision/resnet50",
                             "--teacher-arch", "torchvision/resnet101,torchvision/resnet152", "--teachers", "2",
                             "--image", "224", "--classes", "1000", "--batch", "256", "--iters", "5", "--warmup", "2",
                             "--rounds", "3"], 120,
                            [str(BENCH / "throughput.py"), *THROUGHPUT_DRY, "--teacher-arch", "small_cnn,resnet20",
                             "--methods", "meal"]),
    "loader": ([str(BENCH / "loader.py"), "--images", "3000", "--size", "224", "--min-px", "400", "--max-px", "500",
                "--workers", "15", "--batch", "64", "--batches", "30", "--rounds", "2"], 80,
               [str(BENCH / "loader.py"), "--images", "24", "--size", "16", "--min-px", "20", "--max-px", "40",
                "--workers", "0", "--batch", "4", "--batches", "2", "--rounds", "1"]),
    "real-run": ([str(BENCH / "gpu_check.py"), "--section", "real-run"], 80,
                 [str(BENCH / "gpu_check.py"), "--section", "real-run", "--cpu-dry-run"]),
    "throughput-cifar": ([str(BENCH / "throughput.py"), "--device", "cuda", "--teachers", "5,10", "--batch", "1024",
                          "--methods", "aekd,meal,latentbe", "--iters", "10", "--warmup", "3", "--rounds", "3"], 60,
                         [str(BENCH / "throughput.py"), *THROUGHPUT_DRY, "--teacher-arch", "small_cnn",
                          "--methods", "aekd"]),
}


def run_section(name: str, argv: list[str], box: float, workdir: Path) -> tuple[str, float]:
    print(f"\n## {name} (time box {box:.0f} s)", flush=True)
    env = {**os.environ, "GPU_CHECK_DIR": str(workdir)}
    if name == "loader":
        argv = [*argv, "--dir", str(workdir / "loader")]
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, timeout=box)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = f"stopped at its time box ({box:.0f} s)"
    except OSError as err:
        status = f"could not start ({err})"
    seconds = time.perf_counter() - started
    print(f"-- {name}: {status} in {seconds:.0f} s", flush=True)
    return status, seconds


# ---------------------------------------------------------------------------- the real run
def real_run(dry: bool, workdir: Path) -> int:
    """STEPS steps of `distill` (AVER) from a teacher cache built by `cache-teachers` over a generated folder."""
    import torch

    sys.path.insert(0, str(BENCH))
    from loader import make_folder

    from ensemble_kd import pipeline
    from ensemble_kd.config import load_config
    from ensemble_kd.engine import Trainer
    from ensemble_kd.models import create

    cuda = not dry and torch.cuda.is_available()
    size, batch, lo, hi = (16, 8, 20, 40) if dry else (224, 128, 400, 500)
    teachers, student = (["small_cnn", "resnet20"], "small_cnn") if dry else (
        ["torchvision/resnet101", "torchvision/resnet152"], "torchvision/resnet50")
    folder = make_folder(workdir / "real", STEPS * batch, lo, hi)
    classes = 10
    members = []
    for i, arch in enumerate(teachers):  # untrained weights stand in for trained ones: the speed is the same
        path = workdir / f"teacher{i}.pt"
        torch.save(create(arch, num_classes=classes).state_dict(), path)
        members.append(f"{{arch: {arch}, weights: {path}}}")
    overrides = [f"device={'cuda' if cuda else 'cpu'}", "data.name=image-folder", f"data.root={folder}",
                 f"data.views.size={size}", f"data.batch_size={batch}", "data.val_fraction=0",
                 f"data.workers={0 if dry else 15}", f"student.arch={student}", "student.train.epochs=1",
                 "student.train.log_every=10", "method.name=aver", f"teachers.members=[{', '.join(members)}]",
                 "cache.epochs=1"]
    config = load_config(None, overrides)
    data = pipeline.prepare_data(config)
    started = time.perf_counter()
    cache = pipeline.cache_teachers(config, workdir / "cache", data=data)
    print(f"cache of {len(teachers)} teachers over {data.splits.train.__len__()} images: "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    config = load_config(None, [*overrides, f"teachers.cache={cache}"])

    starts, step_syncs = [], []
    step = Trainer._step

    def timed_step(self, b):
        starts.append(time.perf_counter())
        before = len(caught)
        out = step(self, b)
        step_syncs.append(len(caught) - before)
        return out

    Trainer._step = timed_step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.distill(config, workdir / "run", data=data)
        if cuda:
            torch.cuda.synchronize()
        ended = time.perf_counter()
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
    Trainer._step = step
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    intervals = [b - a for a, b in zip(starts, starts[1:] + [ended])]
    steady = intervals[len(intervals) // 4:] or intervals
    print(f"steps: {len(starts)}, batch {batch}, {size} px, {'cuda' if cuda else 'cpu'}")
    print(f"time per step: median {statistics.median(steady) * 1e3:.1f} ms over the last "
          f"{len(steady)} steps ({batch / statistics.median(steady):,.0f} img/s); first step "
          f"{intervals[0] * 1e3:.0f} ms")
    if cuda:
        print(f"forced syncs: {sum(step_syncs)} inside the steps ({step_syncs}), {len(syncs)} in the whole distill")
        for where, n in collections.Counter(f"{w.filename}:{w.lineno}" for w in syncs).most_common(8):
            print(f"  {n:>4} x {where}")
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print("forced syncs: not counted on the CPU (set_sync_debug_mode is CUDA's)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    p.add_argument("--only", default="", help="comma list of sections (default: all)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # a section run in its own process
    args = p.parse_args(argv)
    if args.section == "real-run":
        workdir = Path(os.environ.get("GPU_CHECK_DIR") or tempfile.mkdtemp(prefix="gpu-check-"))
        return real_run(args.cpu_dry_run, workdir)

    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu-dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        print(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_dry_run else "cpu (dry run)"
    print(f"# gpu check: {gpu}, torch {torch.__version__}, python {sys.version.split()[0]}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in names:
            gpu_argv, box, dry_argv = SECTIONS[name]
            results[name] = run_section(name, dry_argv if args.cpu_dry_run else gpu_argv,
                                        box, Path(tmp))
    print("\n| section | result | seconds |\n|:---|:---|---:|")
    for name, (status, seconds) in results.items():
        print(f"| {name} | {status} | {seconds:.0f} |")
    return 0 if all(status == "ok" for status, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
