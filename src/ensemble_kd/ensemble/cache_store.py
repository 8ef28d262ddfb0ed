"""The teacher cache's files: .npy shards written atomically as a build goes, a progress record per
rank so that a killed build resumes, then one array per key and epoch, read memory-mapped.

While a build runs (see cache.py for cache.json):
- `epoch_003.rank1.shard00002.<key>.npy`: shard 2 of rank 1's part of epoch 3, one file per key:
  `index` int32 (n,) the dataset indices of its rows, and `logits` (n, M, K) in the storage dtype,
  or with top_k = k, `values` (n, M, k), `classes` (n, M, k) int16/int32 and `fill` (n, M).
- `progress.rank1.json`: how many rows each finished shard of each epoch holds, and the build
  key (what the shards were made for). A shard counts only once it is in the record, which is
  rewritten atomically after the shard's files, so a kill leaves at worst a shard to redo.
Once every rank has finished, rank 0 gathers each epoch's shards into `epoch_003.<key>.npy`, row i
holding dataset index i, and `epoch_003.present.npy` uint8 (N,) (1 where the build saw the
index), then removes the shards: a lookup is one fancy index per key, whatever the world size
that built the cache or reads it.

Reading opens every array with numpy's mmap_mode='r': a training process holds only the rows
of its batches, whatever the cache's size.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np

from ..engine.checkpoint import atomic_write, atomic_write_text

__all__ = ["array_damage", "cache_bytes", "class_dtype", "consolidate", "describe_size", "EpochReader", "read_progress", "read_record",
           "remove_built_files", "remove_rank_files", "shard_file", "write_progress", "write_shard"]

ITEM_BYTES = {"float16": 2, "float32": 4}


def class_dtype(num_classes: int):
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def cache_bytes(num_samples: int, members: int, num_classes: int, epochs: int = 1, *, top_k: int | None = None,
                dtype: str = "float16") -> int:
    """The bytes of array data a finished cache holds (each .npy file adds a header of ~128 bytes; while
    it is built, the shards take as much again).

    Per sample, epoch and teacher: K logits, or k values + k class ids + 1 fill value; per sample
    and epoch: one byte saying it is present.
    """
    item = ITEM_BYTES[dtype]
    if top_k is None:
        per_member = num_classes * item
    else:
        per_member = top_k * (item + np.dtype(class_dtype(num_classes)).itemsize) + item
    return epochs * num_samples * (members * per_member + 1)


def describe_size(num_samples: int, members: int, num_classes: int, epochs: int = 1, *, top_k: int | None = None,
                  dtype: str = "float16") -> str:
    """One line: 'cache: 1,281,167 images x 4 teachers x 1 epoch, top-10 fp16 -> 0.23 GB'."""
    size = cache_bytes(num_samples, members, num_classes, epochs, top_k=top_k, dtype=dtype)
    kind = f"top-{top_k}" if top_k is not None else f"all {num_classes} logits"
    amount = f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    return (f"cache: {num_samples:,} images x {members} teacher{'s' * (members != 1)} x {epochs} "
            f"epoch{'s' * (epochs != 1)}, {kind} {dtype.replace('float', 'fp')} -> {amount}")


# ---------------------------------------------------------------------------- writing

def shard_file(epoch: int, rank: int, shard: int, key: str) -> str:
    return f"epoch_{epoch:03d}.rank{rank}.shard{shard:05d}.{key}.npy"


def epoch_file(epoch: int, key: str) -> str:
    return f"epoch_{epoch:03d}.{key}.npy"


def _progress_file(rank: int | str) -> str:
    return f"progress.rank{rank}.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_shard(cache_dir: Path, epoch: int, rank: int, shard: int, arrays: dict[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        _save_npy(cache_dir / shard_file(epoch, rank, shard, key), array)


def read_record(path: Path) -> dict | None:
    """A JSON object, or None when it is missing, torn by a kill or otherwise damaged (not text, not
    JSON, not an object): the build then redoes what it describes."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def array_damage(path: Path, rows: int | None = None) -> str | None:
    """What is wrong with a stored array, read as the reader maps it: "x.npy is missing", "x.npy is
    damaged (...)", or one holding another number of rows than `rows`; None when it is whole."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:  # a cut header or data: numpy's own words say which
        return f"{path.name} is damaged ({err})"
    if rows is not None and array.shape[:1] != (rows,):
        return f"{path.name} is damaged (it holds {array.shape[0] if array.ndim else 0} rows, not {rows})"
    return None


def read_progress(cache_dir: Path, rank: int) -> dict | None:
    return read_record(cache_dir / _progress_file(rank))


def write_progress(cache_dir: Path, rank: int, record: dict) -> None:
    atomic_write_text(cache_dir / _progress_file(rank), json.dumps(record))


def remove_rank_files(cache_dir: Path, rank: int | None = None) -> None:
    """The shards (of any format) and progress record of `rank`, or of every rank: before a fresh
    build of that rank's part, or once the shards are gathered."""
    which = "*" if rank is None else str(rank)
    for path in [*cache_dir.glob(f"epoch_*.rank{which}.*"), *cache_dir.glob(_progress_file(which))]:
        path.unlink(missing_ok=True)


def remove_built_files(cache_dir: Path) -> None:
    """The gathered arrays of an earlier build (rank 0, when a build starts that is not that one)."""
    for path in cache_dir.glob("epoch_[0-9][0-9][0-9].*.npy"):
        if ".rank" not in path.name:
            path.unlink()


def _reserve(tmp: Path, final: Path) -> None:
    """Allocate the memory-mapped file's blocks now: a full disk is then an OSError naming the file,
    not a SIGBUS when a page is written."""
    try:
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: written as before
            return
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(final)) from None


def consolidate(cache_dir: Path, epoch: int, num_samples: int, shards: list[tuple[int, int]],
                keys: tuple[str, ...]) -> int:
    """Gather epoch `epoch`'s shards ((rank, shard) each) into one array per key, row i = dataset index
    i, written through a memory map (never whole in RAM) and renamed into place; returns how many
    indices no shard holds (a loader read in its training order drops some)."""
    present = np.zeros(num_samples, dtype=np.uint8)
    for key in keys:
        tmp = cache_dir / f".{epoch_file(epoch, key)}.tmp"
        out = None
        for rank, shard in shards:
            rows = np.load(cache_dir / shard_file(epoch, rank, shard, key), mmap_mode="r")
            index = np.load(cache_dir / shard_file(epoch, rank, shard, "index"))
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=rows.dtype, shape=(num_samples, *rows.shape[1:]))
                _reserve(tmp, cache_dir / epoch_file(epoch, key))
            out[index] = rows  # a repeated index (padding): the same view, the same row
            present[index] = 1
        out.flush()
        del out
        os.replace(tmp, cache_dir / epoch_file(epoch, key))
    _save_npy(cache_dir / epoch_file(epoch, "present"), present)
    return int(num_samples - present.sum(dtype=np.int64))


# ---------------------------------------------------------------------------- reading

class EpochReader:
    """The rows of one epoch, gathered from its memory-mapped arrays by dataset index."""

    def __init__(self, cache_dir: Path, epoch: int, keys: tuple[str, ...]):
        self.cache_dir, self.epoch, self.keys = cache_dir, epoch, keys

    def files(self) -> list[Path]:
        return [self.cache_dir / epoch_file(self.epoch, key) for key in ("present", *self.keys)]

    def damage(self, num_samples: int) -> str | None:
        """The first of this epoch's arrays that is missing or damaged, in words; None when all are whole."""
        return next((d for d in (array_damage(f, num_samples) for f in self.files()) if d is not None), None)

    def open(self) -> None:
        self.present = np.load(self.cache_dir / epoch_file(self.epoch, "present"), mmap_mode="r")
        self.arrays = {key: np.load(self.cache_dir / epoch_file(self.epoch, key), mmap_mode="r") for key in self.keys}

    def __getstate__(self) -> dict:
        """Without the memory maps (pickled, one would carry the whole array): reopened on first use."""
        return {k: v for k, v in self.__dict__.items() if k not in ("present", "arrays")}

    def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """{key: rows of `index`}; a ValueError names an index the cache does not hold."""
        if not hasattr(self, "arrays"):
            self.open()
        seen = self.present[index]
        if not seen.all():
            missing = int(index[np.argmin(seen)])
            raise ValueError(f"teacher cache '{self.cache_dir}' holds no logits for sample {missing} of view "
                             f"epoch {self.epoch}: the loader it was built from did not yield it")
        return {key: array[index] for key, array in self.arrays.items()}
