"""Images/s and peak memory of our streamed training loader against torchvision's ImageFolder + DataLoader.

Both read the same generated folder of photographic JPEGs (crops of scikit-learn's two sample
photos, rescaled to 400-500 px, colour-jittered, with sensor-like noise, saved at quality 90:
flat coloured blocks decode far faster than photographs and flatter every loader) with the same
transforms (RandomResizedCrop(size) + horizontal flip, ToTensor + Normalize) and the same number
of workers, each measurement in its own process (peak RSS of the main process and of its largest
worker), in interleaved rounds (each of our decoders, torchvision, ...), then the median and
spread of each row and of its ratio to torchvision's row of the same round.

    python benchmarks/loader.py --workers 15            # a GPU box: 224 px, 5,000 and 50,000 images
    python benchmarks/loader.py --quick --workers 2     # a CPU check in a few minutes
"""

from __future__ import annotations

import argparse
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


def _photos():
    """scikit-learn's two sample photographs (china.jpg, flower.jpg; 640x427) as RGB arrays."""
    from sklearn.datasets import load_sample_image

    return [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]


def _write_photos(root: Path, first: int, stop: int, lo: int, hi: int, seed: int) -> None:
    """Images first..stop-1 of the folder; image i's pixels depend on (seed, i) alone."""
    from PIL import Image

    photos = _photos()
    for i in range(first, stop):
        rng = np.random.default_rng([seed, i])
        photo = photos[i % len(photos)]
        ph, pw = photo.shape[:2]
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        cw, ch = int(rng.integers(pw * 6 // 10, pw + 1)), int(rng.integers(ph * 6 // 10, ph + 1))
        x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(image, np.float32) * rng.uniform(0.8, 1.2, 3) + rng.normal(0, 4, (h, w, 3))
        if rng.integers(2):
            pixels = pixels[:, ::-1]
        folder = root / "train" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def make_folder(root: Path, count: int, lo: int, hi: int, seed: int = 0, processes: int = 1) -> Path:
    """root/train/c<k>/<i>.jpg: `count` distinct photographic JPEGs, sides lo..hi px, quality 90,
    written by `processes` processes."""
    from concurrent.futures import ProcessPoolExecutor

    done = root / f"done-{count}"
    if done.is_file():
        return root
    if processes <= 1:
        _write_photos(root, 0, count, lo, hi, seed)
    else:
        step = -(-count // processes)
        with ProcessPoolExecutor(processes) as pool:
            for job in [pool.submit(_write_photos, root, a, min(a + step, count), lo, hi, seed)
                        for a in range(0, count, step)]:
                job.result()
    for k in range(CLASSES):  # the layout needs a test split; the benchmark never reads it
        (root / "test" / f"c{k}").mkdir(parents=True, exist_ok=True)
        (root / "test" / f"c{k}" / "0.jpg").write_bytes((root / "train" / f"c{k}" / f"{k:06d}.jpg").read_bytes())
    done.write_text("ok")
    return root


def _our_loader(root: Path, size: int, workers: int, batch: int, decoder: str, device: str):
    """Our training loader; `decoder` is data.decoder, "+draft" for data.draft."""
    from ensemble_kd.data.crops import ViewSpec
    from ensemble_kd.data.samples import list_image_folder
    from ensemble_kd.data.stream import StreamLoader

    train, _ = list_image_folder(root, size)
    name, _, draft = decoder.partition("+")
    spec = ViewSpec(size=size, decoder=name, draft=draft == "draft")
    return StreamLoader(train, batch_size=batch, mean=MEAN, std=STD, spec=spec, workers=workers, device=device)


def _ours(root: Path, size: int, workers: int, batch: int, decoder: str, device: str):
    return (b.x for b in _our_loader(root, size, workers, batch, decoder, device).batches(0))


def _torchvision_dataset(root: Path, size: int):
    """What torchdistill, mdistiller, MEAL-V2 and FKD train from."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return datasets.ImageFolder(str(root / "train"), transform=transform)


def _torchvision(root: Path, size: int, workers: int, batch: int, device: str):
    """torchvision's ImageFolder + DataLoader; the batch goes to `device` as ours does."""
    import torch

    loader = torch.utils.data.DataLoader(_torchvision_dataset(root, size), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, pin_memory=device.startswith("cuda"))
    return (x.to(device, non_blocking=True) for x, _ in loader)


def _one_worker(kind: str, root: Path, size: int, batch: int):
    """(a function making the batch of some indices as one loader worker does, dataset size) for `kind`."""
    if kind == "torchvision":
        from torch.utils.data import default_collate

        dataset = _torchvision_dataset(root, size)
        return (lambda idx: default_collate([dataset[i] for i in idx])), len(dataset)
    from ensemble_kd.data.stream import _ViewBatches  # the worker's own item: decode, views, batch

    loader = _our_loader(root, size, 0, batch, kind.removeprefix("ours "), "cpu")
    items = _ViewBatches(loader.samples, loader.spec, loader.mix, train=True, seed=loader.seed, policy="stop")
    return (lambda idx: items[(0, idx)]), len(loader.samples)


def worker_cost(kinds: list[str], root: Path, size: int, batch: int, batches: int, rounds: int) -> dict:
    """CPU milliseconds per image of one worker's work (process time, so a busy machine counts less),
    each kind on the same random images, in interleaved rounds: {kind: [ms per round]}."""
    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker
    makers = {kind: _one_worker(kind, root, size, batch) for kind in kinds}
    n = next(iter(makers.values()))[1]
    order = np.random.default_rng(0).permutation(n)[:batch * batches].reshape(batches, batch).tolist()
    cost = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, (make, _) in makers.items():
            make(order[0])  # warm: imports, first allocations
            started = time.process_time()
            for idx in order:
                make(idx)
            cost[kind].append((time.process_time() - started) * 1e3 / (batch * batches))
    return cost


def child(kind: str, root: Path, size: int, workers: int, batch: int, batches: int, device: str = "cpu") -> dict:
    """One measurement: images/s over `batches` batches after the first (which starts the workers), peak RSS.
    `kind`: "torchvision", or our loader's decoder (pil, torchvision, pil+draft)."""
    import torch
    import torchvision  # noqa: F401  imported before timing, for both loaders alike

    torch.set_num_threads(1)
    if kind == "torchvision":
        it = _torchvision(root, size, workers, batch, device)
    else:
        it = _ours(root, size, workers, batch, kind.removeprefix("ours "), device)
    next(it)
    started = time.perf_counter()
    images = 0
    for _, x in zip(range(batches), it):
        images += x.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    it.close()  # shuts the workers down, so their peak RSS is counted below
    return {"images_per_s": images / seconds, "rss_main_mb": _peak_rss_mb(),
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM on Linux (ru_maxrss keeps the peak of the process that exec'd it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="5000,50000", help="folder sizes, comma-separated (peak RSS against them)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--min-px", type=int, default=400)
    p.add_argument("--max-px", type=int, default=500)
    p.add_argument("--workers", type=int, default=15, help="loader workers of every row (15 on a 16-core GPU box)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="batches timed per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decoders", default="pil,torchvision", help="our rows: data.decoder values, +draft for data.draft")
    p.add_argument("--device", default="cpu", help="where the batches go (cuda: pinned, normalised on the GPU)")
    p.add_argument("--quick", action="store_true", help="a CPU check: 500 and 2,000 images, 12 batches a row")
    p.add_argument("--dir", default="/tmp/ensemble-kd-loader-bench", help="where the generated folders are kept")
    p.add_argument("--child", nargs=2, metavar=("KIND", "ROOT"), help=argparse.SUPPRESS)
    p.add_argument("--worker-cost", nargs=2, metavar=("KINDS", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, root = args.child
        print(json.dumps(child(kind, Path(root), args.size, args.workers, args.batch, args.batches, args.device)))
        return 0
    if args.worker_cost:
        kinds, root = args.worker_cost
        print(json.dumps(worker_cost(kinds.split(","), Path(root), args.size, args.batch, args.batches, args.rounds)))
        return 0
    if args.quick:
        args.images, args.batches = "500,2000", 12
    counts = [int(c) for c in args.images.split(",")]
    roots = {n: make_folder(Path(args.dir) / f"photos{n}-{args.min_px}-{args.max_px}", n, args.min_px, args.max_px,
                            processes=max(1, args.workers)) for n in counts}
    kinds = [f"ours {d}" for d in args.decoders.split(",")] + ["torchvision"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}

    def run(*flags, batch=args.batch, batches=args.batches):  # a fresh process each: its peaks are its own
        cmd = [sys.executable, __file__, *flags, "--size", str(args.size), "--workers", str(args.workers),
               "--batch", str(batch), "--batches", str(batches), "--device", args.device]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    worker_batch = min(args.batch, counts[0])
    worker_batches = max(1, min(args.batches, counts[0] // worker_batch))
    cost = run("--worker-cost", ",".join(kinds), str(roots[counts[0]]), "--rounds", str(args.rounds),
               batch=worker_batch, batches=worker_batches)
    print(f"One worker's CPU per image (process time; RandomResizedCrop({args.size}) + flip, ours uint8 "
          f"channels_last, torchvision ToTensor + Normalize + collate), {worker_batches} batches of "
          f"{worker_batch}, {args.rounds} interleaved rounds, photographic JPEGs "
          f"{args.min_px}-{args.max_px} px at quality 90\n")
    print("| loader | ms per image (median ± spread) | images/s per worker | ours / torchvision |")
    print("| --- | --- | --- | --- |")
    for kind in kinds:
        ms = statistics.median(cost[kind])
        ratios = [t / o for o, t in zip(cost[kind], cost["torchvision"])]
        ratio = f"{statistics.median(ratios):.2f} ± {_spread(ratios):.2f}" if kind != "torchvision" else ""
        print(f"| {kind} | {ms:.2f} ± {_spread(cost[kind]):.2f} | {1e3 / ms:.0f} | {ratio} |")
    print()
    results: dict[tuple[int, str], list[dict]] = {(n, k): [] for n in counts for k in kinds}
    for _ in range(args.rounds):  # interleaved: a busy spell hits every loader alike
        for n in counts:
            for kind in kinds:
                results[(n, kind)].append(run("--child", kind, str(roots[n])))
    print(f"RandomResizedCrop({args.size}) + flip + normalise, {args.workers} workers, batch {args.batch}, "
          f"{args.batches} batches per measurement, {args.rounds} interleaved rounds, photographic JPEGs "
          f"{args.min_px}-{args.max_px} px at quality 90, batches on {args.device}\n")
    print("| images | loader | images/s (median ± spread) | per worker | ours / torchvision | peak RSS main (MB) "
          "| peak RSS worker (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    wide = False
    for n in counts:
        theirs = [r["images_per_s"] for r in results[(n, "torchvision")]]
        for kind in kinds:
            rows = results[(n, kind)]
            speed = [r["images_per_s"] for r in rows]
            med = statistics.median(speed)
            wide |= _spread(speed) > 0.2 * med
            ratios = [a / b for a, b in zip(speed, theirs)]
            ratio = f"{statistics.median(ratios):.2f} ± {_spread(ratios):.2f}" if kind != "torchvision" else ""
            print(f"| {n} | {kind} | {med:.0f} ± {_spread(speed):.0f} | {med / max(args.workers, 1):.0f} | {ratio} "
                  f"| {max(r['rss_main_mb'] for r in rows):.0f} | {max(r['rss_worker_mb'] for r in rows):.0f} |")
    if wide:
        print("\nwarning: some rows spread by more than 20% of their median: the machine was busy; rerun.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
