"""StreamLoader: images decoded in DataLoader workers, batch by batch, with seeded views.

Each batch of dataset indices is one DataLoader item: a worker reads and decodes those images,
makes each one's view (RandomResizedCrop or the eval crop, a pure function of (seed, epoch,
index) for a given decoder) and returns one uint8 batch, pinned: a (B, 3, S, S) tensor whose
memory is (B, S, S, 3), i.e. channels_last, as the views are made (no transpose in the worker,
none on the device for channels_last models). The main process moves it to the device, applies
the device-side parts (crop_flip, normalisation, mixing) exactly as DeviceLoader does, and yields
the Batch. The order is ShardedLoader's, so ranks split every epoch and resuming mid-epoch skips
batches without reading them; the pixels do not depend on the number of workers. Memory holds
the listing (a few dozen bytes per sample) and `workers x prefetch` batches in flight.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Iterable, Iterator

import numpy as np
import torch

from .crops import ViewSpec, view_of_pixels, view_plan
from .decode import decode_rgb, decoder_fingerprint
from .loader import Batch, ShardedLoader, worker_options
from .mixing import MixSpec, mix_params, mix_views
from .samples import DecodeError, Samples
from .views import AugmentSpec, crop_flip, normalize

__all__ = ["StreamLoader", "estimate_channel_stats", "DECODE_POLICIES"]

DECODE_POLICIES = ("stop", "skip")
_SUBSTITUTE_TRIES = 32  # skip: the next index that decodes stands in for a broken one


class _ViewBatches(torch.utils.data.Dataset):
    """Item (view_epoch or -1, indices) -> the uint8 views of those samples (and of their mix partners)."""

    def __init__(self, samples: Samples, spec: ViewSpec, mix: MixSpec, *, train: bool, seed: int, policy: str,
                 rows=None):
        self.samples, self.spec, self.mix = samples, spec, mix
        self.train, self.seed, self.policy = train, seed, policy
        self.rows = rows  # a teacher cache's row source: the worker gathers each batch's rows too

    def _view(self, i: int, epoch: int | None, skipped: list) -> tuple[torch.Tensor, int]:
        """Sample i's (S, S, 3) view and label; a broken image stops, or is replaced by the next one that decodes."""
        n = len(self.samples)
        for k in range(_SUBSTITUTE_TRIES):
            j = (i + k) % n
            plan = partial(view_plan, self.spec, train=self.train, seed=self.seed, epoch=epoch, index=j)
            draft = partial(_draft_scale, plan) if self.spec.draft and self.train else None  # eval: full decode
            try:
                pixels, full = decode_rgb(self.samples.read(j), self.samples.describe(j), decoder=self.spec.decoder,
                                          scale_for=draft)
            except (DecodeError, OSError) as err:
                if self.policy == "stop":
                    raise DecodeError(str(err) if isinstance(err, DecodeError) else
                                      f"cannot read {self.samples.describe(j)} ({err})") from None
                skipped.append(self.samples.describe(j))
                continue
            return view_of_pixels(pixels, plan(*full), full), int(self.samples.labels[j])
        raise DecodeError(f"{_SUBSTITUTE_TRIES} images in a row from {self.samples.describe(i)} cannot be decoded")

    def __getitem__(self, key):
        epoch, indices = key
        epoch = None if epoch < 0 else epoch
        idx = torch.as_tensor(indices, dtype=torch.int64)
        skipped: list[str] = []
        try:
            views, labels = zip(*(self._view(int(i), epoch, skipped) for i in idx))
            out = {"x": _stack(views), "y": torch.tensor(labels), "index": idx}
            if epoch is not None and self.train and self.mix.enabled:
                s = self.spec.size
                partner = mix_params(idx, epoch=epoch, seed=self.seed, num_samples=len(self.samples), height=s,
                                     width=s, spec=self.mix).partner
                own = partner == idx  # unmixed samples pair with themselves: no second decode
                pv, pl = zip(*((views[k], labels[k]) if own[k] else self._view(int(j), epoch, skipped)
                               for k, j in enumerate(partner)))
                out.update(partner_x=_stack(pv), partner_y=torch.tensor(pl), partner=partner)
        except DecodeError as err:
            return {"error": str(err)}  # raised in the main process: one sentence, no worker traceback
        out["skipped"] = skipped
        if self.rows is not None and epoch is not None:
            try:
                out["teacher_rows"] = self.rows(idx, epoch)
            except ValueError as err:  # an index the cache does not hold
                return {"cache_error": str(err)}
        return out


def _draft_scale(plan, width: int, height: int) -> int:
    return plan(width, height).draft_scale()


def _stack(views) -> torch.Tensor:
    """(B, 3, S, S) uint8 whose memory is the (B, S, S, 3) views side by side: channels_last, no transpose."""
    return torch.stack(views).permute(0, 3, 1, 2)


def _identity(item):
    return item


class _PassKeys(torch.utils.data.Sampler):
    """The (view_epoch, indices) keys of the pass at hand, set before each pass."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class StreamLoader(ShardedLoader):
    """Seeded batches of a listed image dataset (`Samples`), decoded by `workers` processes.

    `spec` makes the decoded views; `augment` is the device-side crop_flip of `spec.train ==
    "crop_flip"`; `mix` the seeded mixup / CutMix. The interface is DeviceLoader's: `batches`,
    `batches_at`, `len`, `input_shape`, `labels`, `size`, `seed`, `train`.
    """

    ships_teacher_rows = True  # batches(..., rows=) carries each batch's teacher-cache rows

    def __init__(self, samples: Samples, *, batch_size: int, mean, std, spec: ViewSpec,
                 augment: AugmentSpec = AugmentSpec(), mix: MixSpec = MixSpec(), train: bool = True, seed: int = 0,
                 device="cpu", drop_last: bool | None = None, rank: int = 0, world_size: int = 1, workers: int = 2,
                 prefetch: int = 2, on_decode_error: str = "stop") -> None:
        super().__init__(len(samples), batch_size=batch_size, train=train, seed=seed, device=device,
                         drop_last=drop_last, rank=rank, world_size=world_size)
        if on_decode_error not in DECODE_POLICIES:
            raise ValueError(f"on_decode_error must be one of {', '.join(DECODE_POLICIES)}, got {on_decode_error!r}.")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be a non-negative integer, got {workers!r}.")
        self.samples, self.spec, self.augment, self.mix = samples, spec, augment, mix
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.workers, self.prefetch, self.on_decode_error = workers, prefetch, on_decode_error
        self.labels = torch.from_numpy(samples.labels)
        self.num_classes = samples.num_classes
        self.skipped: list[str] = []  # images replaced by a substitute in the last pass (on_decode_error=skip)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return 3, self.spec.size, self.spec.size

    def batches(self, epoch: int | None, start: int = 0, view_epoch: int | None = None,
                rows=None) -> Iterator[Batch]:
        """Yield the epoch's batches, skipping the first `start` (not read) to resume mid-epoch;
        `rows` (a teacher cache's `row_source()`): the workers ship each batch's cache rows with it."""
        view_epoch = epoch if view_epoch is None else view_epoch
        return self.batches_at(self.batch_indices(epoch, start), view_epoch, rows=rows)

    def batches_at(self, index_batches: Iterable[torch.Tensor], view_epoch: int | None,
                   rows=None) -> Iterator[Batch]:
        """The batches of the views (seed, view_epoch, index) of each chunk of dataset indices, in order."""
        view_epoch = view_epoch if self.train else None
        for item in self._decoded(index_batches, view_epoch, rows):
            yield self._to_batch(item, view_epoch)

    def eval_views(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval views of the first n samples as uint8 (n, C, H, W), and their labels, on the
        device: what robustness metrics corrupt. Read once and kept (a few hundred MB at 224 px)."""
        n = min(int(n), self.size)
        held = getattr(self, "_eval_views", None)
        if held is None or len(held[0]) < n:
            chunks = torch.arange(n).split(self.batch_size)
            items = list(self._decoded(chunks, None))
            held = (torch.cat([i["x"] for i in items]).to(self.device), torch.cat([i["y"] for i in items]).to(self.device))
            self._eval_views = held
        return held[0][:n], held[1][:n]

    def _decoded(self, index_batches: Iterable[torch.Tensor], view_epoch: int | None, rows=None) -> Iterator[dict]:
        """The workers' decoded uint8 views of each chunk of indices, in order; a bad image stops
        (or, with on_decode_error=skip, is replaced and named at the end)."""
        loader = self._worker_pool(rows)
        loader.sampler.keys = [(-1 if view_epoch is None else int(view_epoch), idx.cpu().tolist())
                               for idx in index_batches]
        self._pass = this_pass = object()
        self.skipped = []
        for item in loader:
            if self._pass is not this_pass:  # the workers serve one pass at a time
                raise RuntimeError("a StreamLoader was read by a second pass before this one ended; "
                                   "finish (or drop) one pass of batches() before starting another")
            if "error" in item:
                raise DecodeError(f"{item['error']}; remove or replace the file, or set "
                                  f"data.on_decode_error=skip to train on without it.")
            if "cache_error" in item:
                raise ValueError(item["cache_error"])
            self.skipped.extend(item["skipped"])
            yield item
        if self.skipped:
            print(f"data: {len(self.skipped)} image(s) could not be decoded and were replaced by the next "
                  f"sample (data.on_decode_error=skip), first {self.skipped[0]}", file=sys.stderr, flush=True)

    def shard(self, rank: int, world_size: int) -> "StreamLoader":
        part = super().shard(rank, world_size)
        part._pool = None  # its own workers: two loaders' passes may interleave
        return part

    def _worker_pool(self, rows=None) -> torch.utils.data.DataLoader:
        """One DataLoader for every pass: its workers persist (no re-fork, no re-pickling of the listing
        each epoch); each pass hands it that pass's keys, so a view stays a function of (seed, epoch, index).
        The workers hold the cache's row source they were made with: another one (the trainer's, after the
        first batch that binds the method) makes the pool anew, once."""
        if getattr(self, "_pool", None) is None or rows is not self._pool_rows:
            dataset = _ViewBatches(self.samples, self.spec, self.mix, train=self.train, seed=self.seed,
                                   policy=self.on_decode_error, rows=rows)
            self._pool, self._pool_rows = None, rows  # the old pool's workers end with it
            self._pool = torch.utils.data.DataLoader(
                dataset, sampler=_PassKeys(), batch_size=None, collate_fn=_identity, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=self.prefetch if self.workers else None,
                persistent_workers=self.workers > 0, **worker_options(self.workers))
        return self._pool

    def _device_views(self, x_u8: torch.Tensor, index: torch.Tensor, view_epoch: int | None) -> torch.Tensor:
        x_u8 = x_u8.to(self.device, non_blocking=True)
        if view_epoch is not None and self.spec.train == "crop_flip" and self.augment.enabled:
            x_u8 = crop_flip(x_u8, index.to(self.device, non_blocking=True), epoch=view_epoch, seed=self.seed,
                             spec=self.augment)
        return normalize(x_u8, self.mean, self.std)

    def _to_batch(self, item: dict, view_epoch: int | None) -> Batch:
        # Everything comes pinned from the DataLoader on a GPU: copies the host does not wait for.
        def on_device(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)
        index = on_device(item["index"])
        x = self._device_views(item["x"], item["index"], view_epoch)
        y = on_device(item["y"])
        rows = item.get("teacher_rows")
        rows = {k: on_device(v) for k, v in rows.items()} if rows is not None else None
        if "partner_x" not in item:
            return Batch(x, y, index, teacher_rows=rows)
        params = mix_params(index, epoch=view_epoch, seed=self.seed, num_samples=self.size,
                            height=x.shape[2], width=x.shape[3], spec=self.mix)
        partner_x = self._device_views(item["partner_x"], item["partner"], view_epoch)
        x, target = mix_views(x, partner_x, y, on_device(item["partner_y"]), params, self.num_classes)
        return Batch(x, y, index, target, rows)

    # ------------------------------------------------------------------ what the teacher cache names
    def fingerprint_data(self) -> dict:
        """The training set as listed (names, labels, byte sizes): hashing every image would be an epoch's reading."""
        return {"num_samples": self.size, "image_shape": list(self.input_shape), "hash": self.samples.digest()}

    def views_fingerprint(self) -> dict:
        """Everything the training pixels depend on besides the data: the teacher cache compares it."""
        s = self.spec
        augment = {"train": s.train, "size": s.size, "scale": list(s.scale), "ratio": list(s.ratio), "flip": s.flip,
                   "crop_fraction": s.crop_fraction, **decoder_fingerprint(s.decoder, s.draft)}
        if s.train == "crop_flip":
            augment.update(crop_padding=self.augment.crop_padding, crop_flip=self.augment.flip)
        if self.mix.enabled:
            augment.update(mixup_alpha=self.mix.mixup_alpha, cutmix_alpha=self.mix.cutmix_alpha,
                           mix_prob=self.mix.mix_prob)
        return augment


def estimate_channel_stats(samples: Samples, spec: ViewSpec, *, count: int, seed: int, workers: int,
                           batch_size: int = 64, on_decode_error: str = "stop") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) of the eval views of `count` training images drawn with
    `seed`: a pass over a large dataset would cost an epoch of decoding."""
    n = len(samples)
    picked = np.sort(np.random.default_rng(seed).permutation(n)[:min(count, n)])
    loader = StreamLoader(samples, batch_size=batch_size, mean=(0.0,) * 3, std=(1.0,) * 3, spec=spec,
                          train=False, workers=workers, on_decode_error=on_decode_error)
    sums = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    chunks = [torch.from_numpy(picked[i:i + batch_size]) for i in range(0, len(picked), batch_size)]
    for batch in loader.batches_at(chunks, None):  # mean 0, std 1: x is the pixels on the 0..1 scale
        v = batch.x.double()
        sums += v.sum((0, 2, 3))
        squares += (v * v).sum((0, 2, 3))
        pixels += v.shape[0] * v.shape[2] * v.shape[3]
    mean = sums / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std)
