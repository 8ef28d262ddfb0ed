"""DeviceLoader: the whole dataset on one device, batches cut by index, views made on the device."""

from __future__ import annotations

import copy
import ctypes
import functools
import math
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from .datasets import ImageDataset
from .mixing import MixSpec, mix_params, mix_views
from .views import AugmentSpec, hash_ints, make_view

__all__ = ["Batch", "DeviceLoader", "ShardedLoader", "worker_options"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_STREAM_ORDER = 0x0D0E  # keeps the epoch order independent of the per-sample view hashes


def worker_options(workers: int) -> dict:
    """DataLoader arguments for `workers` processes that die with the process that started them: after a
    SIGKILL, orphaned workers would otherwise live on for seconds and print an EOFError traceback."""
    return {"worker_init_fn": functools.partial(_die_with_parent, os.getpid())} if workers else {}


def _die_with_parent(parent: int, worker_id: int) -> None:
    if sys.platform.startswith("linux"):  # the kernel sends SIGKILL when the parent (thread) exits
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took hold
        os._exit(1)
    # The kernel closes a dying parent's sockets just before it signals: a worker thread handing it a
    # tensor (multiprocessing's resource sharer) may see the connection end first. Said by no one.
    default = threading.excepthook
    threading.excepthook = (lambda hook: None if issubclass(hook.exc_type, (EOFError, ConnectionError))
                            else default(hook))


class Batch(NamedTuple):
    """One batch: inputs x float32 (B,C,H,W), labels y int64 (B,), dataset indices int64 (B,).

    `target`: the soft targets (B, K) float32 of mixed views (mixup, CutMix), else None; y then
    stays each sample's own label. Losses against the labels read `targets`.
    `teacher_rows`: the teacher cache's rows of these views ({key: tensor}, on the device), when
    the loader was given a cache's row source; the trainer hands them to the cache.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    target: torch.Tensor | None = None
    teacher_rows: dict[str, torch.Tensor] | None = None

    @property
    def targets(self) -> torch.Tensor:
        """What a cross entropy compares with: the soft targets of mixed views, else the labels."""
        return self.y if self.target is None else self.target


class ShardedLoader:
    """The order of a dataset held on one device: seeded shuffles for training, sharded by rank.

    Train order is a permutation drawn from a CPU generator seeded by hash(seed, epoch), padded to a
    multiple of world_size by repeating its start, and sharded as order[rank::world_size] (like
    DistributedSampler), the last partial batch dropped. Eval order is 0..N-1 sharded the same way
    without padding, every batch kept, so every sample is evaluated exactly once across ranks.
    Subclasses hold the data and cut the batches.
    """

    def __init__(self, size: int, *, batch_size: int, train: bool, seed: int, device, drop_last: bool | None,
                 rank: int, world_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(
                f"rank must be in 0..world_size-1 with world_size >= 1, got rank={rank}, world_size={world_size}."
            )
        if size == 0:
            raise ValueError("the dataset is empty; a loader needs at least one sample.")
        self.size = size
        self.device = torch.device(device)
        self.train, self.seed, self.batch_size = train, seed, batch_size
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (padding included)."""
        if self.train:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def indices(self, epoch: int | None) -> torch.Tensor:
        """This rank's dataset indices for `epoch`, in iteration order (int64, on the host, where the order is
        drawn: a teacher cache reads its rows by them, and the device gets each batch's without waiting)."""
        n = self.size
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        if epoch is None:
            raise ValueError("a training loader needs an integer epoch: the order (and the views) depend on it.")
        gen = torch.Generator().manual_seed(hash_ints(self.seed, epoch, _STREAM_ORDER))
        order = torch.randperm(n, generator=gen)
        total = math.ceil(n / self.world_size) * self.world_size
        if total > n:  # pad by repeating the start, as DistributedSampler does
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        return order[self.rank :: self.world_size]

    def shard(self, rank: int, world_size: int) -> "ShardedLoader":
        """This loader's part for `rank` of `world_size` (eval: every world_size-th sample from rank)."""
        part = copy.copy(self)
        part.rank, part.world_size = rank, world_size
        return part

    def batch_indices(self, epoch: int | None, start: int = 0) -> Iterator[torch.Tensor]:
        """The indices of each of the epoch's batches, skipping the first `start` (to resume mid-epoch)."""
        nb = len(self)
        if not isinstance(start, int) or not 0 <= start <= nb:
            raise ValueError(f"start must be an integer in 0..{nb} (batches per epoch), got {start!r}.")
        order = self.indices(epoch)
        for b in range(start, nb):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


RowSource = Callable[[torch.Tensor, int], dict]  # (host indices, view epoch) -> {key: host rows}


def rows_ahead(index_batches: Iterable[torch.Tensor], rows: RowSource | None, view_epoch: int | None,
               *, pin: bool) -> Iterator[tuple[torch.Tensor, dict | None]]:
    """(indices, their rows or None) for each batch of host indices: a thread gathers the rows of the
    next batch while the caller works on this one (pinned when `pin`, so they reach the device while
    the host goes on). Without `rows`, the indices alone."""
    if rows is None:
        yield from ((idx, None) for idx in index_batches)
        return

    def gather(idx: torch.Tensor) -> dict:
        got = rows(idx, view_epoch)
        return {k: v.pin_memory() for k, v in got.items()} if pin else got

    pool = ThreadPoolExecutor(1, thread_name_prefix="cache-rows")
    try:
        waiting = None
        for idx in index_batches:
            ahead = (idx, pool.submit(gather, idx))
            if waiting is not None:
                yield waiting[0], waiting[1].result()
            waiting = ahead
        if waiting is not None:
            yield waiting[0], waiting[1].result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class DeviceLoader(ShardedLoader):
    """Iterates seeded, augmented (train) or sequential (eval) batches of a dataset held on `device`."""

    ships_teacher_rows = True  # batches(..., rows=) carries each batch's teacher-cache rows

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        spec: AugmentSpec = AugmentSpec(),
        mix: MixSpec = MixSpec(),
        train: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(dataset), batch_size=batch_size, train=train, seed=seed, device=device,
                         drop_last=drop_last, rank=rank, world_size=world_size)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != dataset.in_channels or len(self.std) != dataset.in_channels:
            raise ValueError(
                f"mean and std need {dataset.in_channels} values (one per channel), "
                f"got {len(self.mean)} and {len(self.std)}."
            )
        self.spec, self.mix = spec, mix
        self.num_classes = dataset.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batches(self, epoch: int | None, start: int = 0, view_epoch: int | None = None,
                rows: RowSource | None = None) -> Iterator[Batch]:
        """Yield the epoch's batches, skipping the first `start` (to resume mid-epoch).

        `view_epoch` (default: `epoch`) picks the augmented views apart from the order, so a
        run served by a teacher cache of E epochs can reuse views e % E in a fresh order.
        `rows` (a teacher cache's `row_source()`): each batch carries its views' cache rows.
        """
        view_epoch = epoch if view_epoch is None else view_epoch
        return self.batches_at(self.batch_indices(epoch, start), view_epoch, rows=rows)

    def batches_at(self, index_batches: Iterable[torch.Tensor], view_epoch: int | None,
                   rows: RowSource | None = None) -> Iterator[Batch]:
        """The batches of the views (seed, view_epoch, index) of each chunk of dataset indices, in order:
        what training sees, for any chunking (the teacher cache makes its batches this way)."""
        view_epoch = view_epoch if self.train else None
        rows = rows if view_epoch is not None else None
        for idx, teacher_rows in rows_ahead(index_batches, rows, view_epoch, pin=self.device.type == "cuda"):
            idx = idx.to(self.device, non_blocking=True)
            if teacher_rows is not None:
                teacher_rows = {k: v.to(self.device, non_blocking=True) for k, v in teacher_rows.items()}
            x = self._views(idx, view_epoch)
            y = self.labels.index_select(0, idx)
            if view_epoch is None or not self.mix.enabled:
                yield Batch(x, y, idx, teacher_rows=teacher_rows)
                continue
            params = mix_params(idx, epoch=view_epoch, seed=self.seed, num_samples=self.size,
                                height=x.shape[2], width=x.shape[3], spec=self.mix)
            x, target = mix_views(x, self._views(params.partner, view_epoch), y,
                                  self.labels.index_select(0, params.partner), params, self.num_classes)
            yield Batch(x, y, idx, target, teacher_rows)

    def views_fingerprint(self) -> dict:
        """Everything the training pixels depend on besides the data: the teacher cache compares it."""
        out = {"crop_padding": self.spec.crop_padding, "flip": self.spec.flip}
        if self.mix.enabled:
            out.update(mixup_alpha=self.mix.mixup_alpha, cutmix_alpha=self.mix.cutmix_alpha, mix_prob=self.mix.mix_prob)
        return out

    def _views(self, idx: torch.Tensor, view_epoch: int | None) -> torch.Tensor:
        return make_view(self.images, idx, epoch=view_epoch, seed=self.seed, spec=self.spec,
                         mean=self.mean, std=self.std)
