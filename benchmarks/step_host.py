"""Main-thread host work per cached step, the device step mocked out, beside the loader's batch time.

    python benchmarks/step_host.py                                  # 100k samples, 2 teachers x 1000 classes, fp16
    python benchmarks/step_host.py --samples 20000 --steps 20 --rounds 3    # a quick run

A teacher cache of `--samples` views (random logits, written straight into the cache's layout) serves
two loaders: in-memory data (DeviceLoader, tiny images so that making the views costs little) and
streamed JPEGs (StreamLoader, a few small files listed over and over). Each step takes the next batch
and the teachers' outputs as the trainer does, then sleeps in place of the student's forward and
backward (`--device-step-ms`, or for the streamed loader long enough that its workers keep up: the
regime where the main thread is what limits). The device is mocked out too: the loaders' and the
cache's device-side work runs on PyTorch's meta device (shapes, no arithmetic; its shape functions
are partly Python, so this errs high), so what is timed per step (the batch and the teachers'
outputs) is the host's own work: the main thread's CPU time, and its wall time (which adds any wait
for the loader).

Rows, per loader:
- lookup: the cache read on the main thread from the batch's host indices (main's path before the
  rows were shipped, less its waits for the device, which the CPU cannot show: it copied the
  indices back from the device first; it is also what a loader that cannot ship rows still does);
- shipped: the rows gathered by the loader (a worker, or a thread one batch ahead) and shipped
  with the batch, as the trainer now asks for.
Beside them, the loader's batch time: what one worker spends making a batch of views (decode and
crop, no cache), i.e. how long a step may take before the workers fall behind, per worker.
Rows run in interleaved rounds (lookup, shipped, lookup, shipped, ...); the table gives the median
over rounds of each row's per-round median per step (min-max over the rounds) and of its p90.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ensemble_kd.data import DeviceLoader, ImageDataset
from ensemble_kd.data.crops import ViewSpec
from ensemble_kd.data.samples import ImageFiles
from ensemble_kd.data.stream import StreamLoader, _ViewBatches
from ensemble_kd.ensemble.cache import CachedTeachers
from ensemble_kd.methods import Needs

NEEDS = Needs(teacher_logits=True)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_cache(root: Path, samples: int, members: int, classes: int, device: torch.device) -> CachedTeachers:
    """Epoch 0 of a full-logits fp16 cache in the layout cache_store.py reads, filled with random logits."""
    logits = np.lib.format.open_memmap(root / "epoch_000.logits.npy", mode="w+", dtype=np.float16,
                                       shape=(samples, members, classes))
    rng = np.random.default_rng(0)
    for start in range(0, samples, 8192):
        chunk = logits[start:start + 8192]
        chunk[:] = rng.standard_normal(chunk.shape, dtype=np.float32) * 5
    logits.flush()
    del logits
    np.save(root / "epoch_000.present.npy", np.ones(samples, dtype=np.uint8))
    manifest = {"epochs": 1, "top_k": None, "names": [f"t{i}" for i in range(members)], "num_classes": classes}
    (root / "cache.json").write_text(json.dumps(manifest))
    cached = CachedTeachers(root, manifest, device)
    for reader in cached._epochs:
        reader.open()
    return cached


def device_loader(samples: int, batch: int, device: torch.device) -> DeviceLoader:
    images = torch.randint(0, 256, (samples, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return DeviceLoader(ImageDataset(images, torch.zeros(samples, dtype=torch.int64), ("a",)), batch_size=batch,
                        mean=MEAN, std=STD, device=device)


def stream_loader(root: Path, samples: int, batch: int, workers: int, size: int, device: torch.device) -> StreamLoader:
    """`samples` entries listing 64 small JPEGs over and over: the cache, not the decoding, is large."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "jpegs").mkdir(exist_ok=True)
    for i in range(64):
        pixels = rng.integers(0, 256, (size * 2, size * 2, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        (root / "jpegs" / f"{i}.jpg").write_bytes(buf.getvalue())
    names = [f"jpegs/{i % 64}.jpg" for i in range(samples)]
    files = ImageFiles(root, names, np.zeros(samples, dtype=np.int64), ("a",), size)
    return StreamLoader(files, batch_size=batch, mean=MEAN, std=STD, spec=ViewSpec(size=size), workers=workers,
                        device=device)


def timed_steps(loader, cached: CachedTeachers, shipped: bool, steps: int, warmup: int, device_step_s: float):
    """(CPU seconds, wall seconds) per step of the main thread's batch + teacher outputs, after `warmup`."""
    loader.ships_teacher_rows = shipped
    rows = {"rows": cached.row_source()} if shipped else {}
    it = iter(loader.batches(0, view_epoch=0, **rows))
    host_index = loader.batch_indices(0)
    out = []
    for step in range(warmup + steps):
        start, cpu = time.perf_counter(), time.thread_time()
        batch = next(it)
        index = next(host_index)  # what main's path copied back from the device
        got = {"rows": batch.teacher_rows} if batch.teacher_rows is not None else {}
        cached.outputs(batch.x, NEEDS, index=index, epoch=0, **got)
        if step >= warmup:
            out.append((time.thread_time() - cpu, time.perf_counter() - start))
        time.sleep(device_step_s)  # the student's forward and backward, mocked out
    it.close()
    return out


def batch_time(loader: StreamLoader, batches: int) -> float:
    """Median seconds one worker spends on a batch of views (no cache rows), in this process."""
    views = _ViewBatches(loader.samples, loader.spec, loader.mix, train=True, seed=loader.seed, policy="stop")
    keys = [(0, idx.tolist()) for _, idx in zip(range(batches + 1), loader.batch_indices(0))]
    times = []
    for key in keys:
        start = time.perf_counter()
        views[key]
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=16, help="streamed view side, px")
    parser.add_argument("--device-step-ms", type=float, default=30.0)
    parser.add_argument("--device", default="meta", help="where the device-side work runs (meta: mocked out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cache").mkdir()
        cached = write_cache(root / "cache", args.samples, args.teachers, args.classes, device)
        loaders = {"in-memory": device_loader(args.samples, args.batch, device),
                   "streamed": stream_loader(root, args.samples, args.batch, args.workers, args.size, device)}
        worker_ms = batch_time(loaders["streamed"], 8) * 1e3
        step_s = {"in-memory": args.device_step_ms / 1e3,
                  "streamed": max(args.device_step_ms, 1.5 * worker_ms / max(1, args.workers)) / 1e3}
        rows = [(name, shipped) for name in loaders for shipped in (False, True)]
        stats = {r: [] for r in rows}  # per round: (cpu median, cpu p90, wall median, wall p90), ms
        for _ in range(args.rounds):
            for name, shipped in rows:
                times = np.array(timed_steps(loaders[name], cached, shipped, args.steps, args.warmup,
                                             step_s[name])) * 1e3
                stats[(name, shipped)].append([np.median(times[:, 0]), np.percentile(times[:, 0], 90),
                                               np.median(times[:, 1]), np.percentile(times[:, 1], 90)])
    gb = args.samples * args.teachers * args.classes * 2 / 1e9
    print(f"cache: {args.samples:,} samples x {args.teachers} teachers x {args.classes} classes fp16 ({gb:.2f} GB), "
          f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps, device work on {device}, device step "
          f"mocked as {step_s['in-memory'] * 1e3:g} ms (in-memory), {step_s['streamed'] * 1e3:.0f} ms (streamed, "
          f"{args.workers} worker{'s' * (args.workers != 1)}), torch threads 1")
    print(f"{'loader':<10} {'cache rows':<10} {'main-thread CPU ms/step':>23} {'(min-max)':>14} {'p90':>7} "
          f"{'wall ms/step':>13} {'p90':>7}")
    for name, shipped in rows:
        per_round = np.array(stats[(name, shipped)])
        cpu, wall = per_round[:, 0], per_round[:, 2]
        print(f"{name:<10} {'shipped' if shipped else 'lookup':<10} {np.median(cpu):>23.3f} "
              f"{f'({cpu.min():.3f}-{cpu.max():.3f})':>14} {np.median(per_round[:, 1]):>7.3f} "
              f"{np.median(wall):>13.3f} {np.median(per_round[:, 3]):>7.3f}")
    print(f"streamed loader's batch time: {worker_ms:.1f} ms per batch of {args.batch} per worker "
          f"({args.size} px views of {2 * args.size} px JPEGs)")
    for name in loaders:
        ratio = [a[0] / b[0] for a, b in zip(stats[(name, False)], stats[(name, True)])]
        spread = (max(ratio) - min(ratio)) / statistics.median(ratio)
        warn = "  (spread over 25%: a busy machine)" if spread > 0.25 else ""
        print(f"{name}: main-thread CPU, lookup / shipped = {statistics.median(ratio):.1f}x (min {min(ratio):.1f}, "
              f"max {max(ratio):.1f}){warn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
