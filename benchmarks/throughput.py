"""Throughput of one distillation step: the naive reference beside the engine, in one run.

    python benchmarks/throughput.py                 # GPU sizes (BENCHMARKS.md): ResNet-56 teachers, ResNet-20 student
    python benchmarks/throughput.py --quick         # CPU sizes, for a smoke run and CPU ratios

Rows, per number of teachers M:
- naive: teachers in a Python loop, fp32, eager, then the student's fp32 step (what public KD code does);
- aver online: the engine's step with fast teachers (BN folded, bf16 + channels_last on GPU, compiled with --compile);
- aver cached: the engine's step fed from teacher logits already in memory (what the teacher cache serves);
- every other registered method the engine can run with online teachers (aekd with the host and the
  device solve, meal, ...); MEAL runs
  one teacher per step (drawn per iteration) with its block taps and discriminators.
Each is timed over the same models and batch, in interleaved rounds (naive, aver online, aver
cached, ... then again), so a busy machine slows every row of a round alike: the table gives each
row's median images/s and the median of its per-round ratios to naive and to aver online, with their
min-max over the rounds; a warning names the rows whose ratio moved by more than --spread-warn.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ensemble_kd.config import TrainConfig
from ensemble_kd.data import Batch
from ensemble_kd.engine import Trainer
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.methods import METHODS, TeacherOutput, create_method
from ensemble_kd.models import create


class FixedBatches:
    """A loader that yields the same on-device batch: the step, not the data, is timed."""

    def __init__(self, batch: Batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def batches(self, epoch, start=0, view_epoch=None):
        for _ in range(start, self.steps):
            yield self.batch


class MemoryCache:
    """Teacher logits already in memory, served like a cache (the view is fixed here)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __len__(self):
        return self.logits.shape[0]

    def outputs(self, x, needs, *, index=None, epoch=None, members=None):
        return TeacherOutput(self.logits if members is None else self.logits[members], {})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, batch_size, device, iters) -> float:
    """One timed stretch of `iters` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch_size * iters / (time.perf_counter() - start)


def interleaved_rates(steps: list, batch_size, device, warmup, iters, rounds) -> list[list[float]]:
    """images/s of every step in every round, rounds[r][i]: each round times the steps one after
    another (A B C ... A B C ...), so a slow spell of the machine hits a round, not a row."""
    for step in steps:
        for _ in range(warmup):
            step()
    return [[images_per_second(step, batch_size, device, iters) for step in steps] for _ in range(rounds)]


def ratio_stats(rates: list[list[float]], i: int, ref: int) -> tuple[float, float, float]:
    """Median, min and max over the rounds of step i's rate over step ref's, both of the same round."""
    ratios = [r[i] / r[ref] for r in rates]
    return statistics.median(ratios), min(ratios), max(ratios)


def naive_step(teachers, student, optimizer, x, y, T=4.0):
    """What public KD code does: a Python loop of fp32 eager teachers, then the student."""
    with torch.no_grad():
        probs = [F.softmax(t(x) / T, dim=1) for t in teachers]
    target = torch.stack(probs).mean(0)
    logits = student(x)
    loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * T * T * F.kl_div(
        F.log_softmax(logits / T, dim=1), target, reduction="batchmean")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def engine_step(method_name, student_arch, build, teachers, batch, device, train_cfg, options=None):
    """The engine's step for one method; `build(arch, kwargs)` makes the student the method asks for
    (the plain `student_arch`, EnsembleNet's multi-headed or LatentBE's BatchEnsemble version of it)."""
    method = create_method(method_name, **(options or {}))  # the Trainer binds it
    student = build(*method.student_spec(student_arch, {}, len(teachers)))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(student, method.to(device), FixedBatches(batch, 1), train_cfg, Path(tmp),
                          device=device, teachers=teachers, is_main=False)
    return lambda: trainer._step(batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--teachers", default="1,5,10", help="values of M")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--teacher-arch", default="resnet56",
                        help="one architecture, or a comma list the M members cycle through (resnet101,resnet152)")
    parser.add_argument("--student-arch", default="resnet20")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the teachers")
    parser.add_argument("--methods", default="", help="comma list beyond aver (default: every registered one)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--spread-warn", type=float, default=0.15,
                        help="warn when a ratio's (max - min) / median over the rounds exceeds this")
    parser.add_argument("--quick", action="store_true", help="CPU sizes: small_cnn teachers, batch 128, 16x16")
    if parser.parse_known_args(argv)[0].quick:  # CPU sizes as defaults: flags given beside --quick still win
        parser.set_defaults(teacher_arch="small_cnn", student_arch="small_cnn", batch=128, image=16,
                            teachers="1,5", iters=5, warmup=2)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    shape = (args.batch, 3, args.image, args.image)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    batch = Batch(x, y, torch.arange(args.batch, device=device))
    train_cfg = TrainConfig(epochs=1)
    extra = [m for m in (args.methods.split(",") if args.methods else sorted(METHODS))
             if m and m not in ("ce", "aver", "kd")]

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, batch {args.batch}, {args.teacher_arch} teachers -> "
          f"{args.student_arch} student, {args.image}x{args.image}", flush=True)
    rows, wide = [], []  # rows: (M, label, median images/s, (median, min, max) x naive, ... x aver online)
    for m in [int(v) for v in args.teachers.split(",")]:
        arches = args.teacher_arch.split(",")
        members = [create(arches[i % len(arches)], num_classes=args.classes).to(device).eval() for i in range(m)]
        def new_student(arch=args.student_arch, kwargs=None):  # each row its own: channels_last may switch
            return create(arch, num_classes=args.classes, **(kwargs or {})).to(device)

        student = new_student()
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        fast = TeacherSet(members).prepare_for_inference(compile=args.compile)
        cached = MemoryCache(fast.member_logits(x))
        steps = [("naive fp32 loop", lambda: naive_step(members, student, opt, x, y)),
                 ("aver online", engine_step("aver", args.student_arch, new_student, fast, batch, device, train_cfg)),
                 ("aver cached", engine_step("aver", args.student_arch, new_student, cached, batch, device, train_cfg))]
        variants = [(name, f"{name} online", {}) for name in extra]
        if "aekd" in extra:  # the solve where the Gram is (no host round-trip), beside the host's
            variants.insert(extra.index("aekd") + 1, ("aekd", "aekd online, device solve", {"solver": "device"}))
        for name, label, options in variants:
            try:
                if name == "aekd":
                    options = {**options, "C": max(0.6, 1.0 / m)}  # C must be >= 1/M
                steps.append((label, engine_step(name, args.student_arch, new_student, fast, batch, device,
                                                 train_cfg, options)))
            except (ValueError, TypeError) as err:
                print(f"  skipping {label}: {err}", file=sys.stderr)
        rates = interleaved_rates([s for _, s in steps], args.batch, device, args.warmup, args.iters, args.rounds)
        for i, (label, _) in enumerate(steps):
            median = statistics.median(r[i] for r in rates)
            naive, online = ratio_stats(rates, i, 0), ratio_stats(rates, i, 1)
            rows.append((m, label, median, naive, online))
            if any((hi - lo) > args.spread_warn * med for med, lo, hi in (naive, online)):
                wide.append(f"M={m} {label}")
            print(f"  M={m:>2}  {label:<26} {median:>10,.0f} img/s  x aver online {online[0]:.2f} "
                  f"({online[1]:.2f}-{online[2]:.2f})", flush=True)

    print(f"\n{args.rounds} interleaved rounds of {args.iters} steps; ratios: median (min-max over rounds)")
    print("| M | step | images/s | x naive | x naive min-max | x aver online | x aver online min-max |")
    print("|---:|:---|---:|---:|---:|---:|---:|")
    for m, name, rate, naive, online in rows:
        print(f"| {m} | {name} | {rate:,.0f} | {naive[0]:.2f} | {naive[1]:.2f}-{naive[2]:.2f} | {online[0]:.2f} | "
              f"{online[1]:.2f}-{online[2]:.2f} |")
    if wide:
        print(f"\nwarning: ratios moved by more than {args.spread_warn:.0%} of their median over the rounds for "
              f"{', '.join(wide)}: the machine was busy; rerun with more --rounds or --iters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
