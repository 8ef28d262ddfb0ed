"""Images/s and peak memory of our streamed training loader against torchvision's ImageFolder + DataLoader.

Both read the same generated folder of variable-size JPEGs with the same transforms
(RandomResizedCrop(size) + horizontal flip, normalisation) and the same number of workers,
each measurement in its own process (peak RSS of the main process and of its largest worker),
in interleaved rounds (ours, torchvision, ours, ...), then the median and spread of each row
and of the ratio per round.

    python benchmarks/loader.py --images 2000,20000 --size 112 --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = 10


def make_folder(root: Path, count: int, lo: int, hi: int, seed: int = 0) -> Path:
    """root/train/c<k>/<i>.jpg: `count` photo-like JPEGs (smooth blocks plus noise), sides lo..hi px."""
    from PIL import Image

    done = root / f"done-{count}"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        blocks = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        image = Image.fromarray(blocks).resize((w, h), Image.BILINEAR)
        folder = root / "train" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    for k in range(CLASSES):  # the layout needs a test split; the benchmark never reads it
        (root / "test" / f"c{k}").mkdir(parents=True, exist_ok=True)
        (root / "test" / f"c{k}" / "0.jpg").write_bytes((root / "train" / f"c{k}" / f"{k:06d}.jpg").read_bytes())
    done.write_text("ok")
    return root


def _ours(root: Path, size: int, workers: int, batch: int):
    from ensemble_kd.data.crops import ViewSpec
    from ensemble_kd.data.samples import list_image_folder
    from ensemble_kd.data.stream import StreamLoader

    train, _ = list_image_folder(root, size)
    loader = StreamLoader(train, batch_size=batch, mean=MEAN, std=STD, spec=ViewSpec(size=size), workers=workers)
    return (b.x for b in loader.batches(0))


def _torchvision(root: Path, size: int, workers: int, batch: int):
    import torch
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    return (x for x, _ in loader)


def child(kind: str, root: Path, size: int, workers: int, batch: int, batches: int) -> dict:
    """One measurement: images/s over `batches` batches after the first (which starts the workers), peak RSS."""
    import torch
    import torchvision  # noqa: F401  imported before timing, for both loaders alike

    torch.set_num_threads(1)
    it = (_ours if kind == "ours" else _torchvision)(root, size, workers, batch)
    next(it)
    started = time.perf_counter()
    images = 0
    for _, x in zip(range(batches), it):
        images += x.shape[0]
    seconds = time.perf_counter() - started
    it.close()  # shuts the workers down, so their peak RSS is counted below
    return {"images_per_s": images / seconds, "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="2000,20000", help="folder sizes, comma-separated")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--min-px", type=int, default=100)
    p.add_argument("--max-px", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="batches timed per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/tmp/ensemble-kd-loader-bench", help="where the generated folders are kept")
    p.add_argument("--child", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, root = args.child
        print(json.dumps(child(kind, Path(root), args.size, args.workers, args.batch, args.batches)))
        return 0
    counts = [int(c) for c in args.images.split(",")]
    roots = {n: make_folder(Path(args.dir) / f"n{n}-{args.min_px}-{args.max_px}", n, args.min_px, args.max_px)
             for n in counts}
    results: dict[tuple[int, str], list[dict]] = {(n, k): [] for n in counts for k in ("ours", "torchvision")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    for _ in range(args.rounds):  # interleaved: a busy spell hits both loaders alike
        for n in counts:
            for kind in ("ours", "torchvision"):
                cmd = [sys.executable, __file__, "--child", kind, str(roots[n]), "--size", str(args.size),
                       "--workers", str(args.workers), "--batch", str(args.batch), "--batches", str(args.batches)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                results[(n, kind)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"RandomResizedCrop({args.size}) + flip + normalise, {args.workers} workers, batch {args.batch}, "
          f"{args.batches} batches per measurement, {args.rounds} interleaved rounds, JPEGs "
          f"{args.min_px}-{args.max_px} px\n")
    print("| images | loader | images/s (median ± spread) | per worker | ours / torchvision | peak RSS main (MB) "
          "| peak RSS worker (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    wide = False
    for n in counts:
        ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(results[(n, "ours")],
                                                                         results[(n, "torchvision")])]
        for kind in ("ours", "torchvision"):
            rows = results[(n, kind)]
            speed = [r["images_per_s"] for r in rows]
            med = statistics.median(speed)
            wide |= _spread(speed) > 0.2 * med
            ratio = f"{statistics.median(ratios):.2f} ± {_spread(ratios):.2f}" if kind == "ours" else ""
            print(f"| {n} | {kind} | {med:.0f} ± {_spread(speed):.0f} | {med / max(args.workers, 1):.0f} | {ratio} "
                  f"| {max(r['rss_main_mb'] for r in rows):.0f} | {max(r['rss_worker_mb'] for r in rows):.0f} |")
    if wide:
        print("\nwarning: some rows spread by more than 20% of their median: the machine was busy; rerun.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
