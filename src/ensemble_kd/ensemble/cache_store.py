"""The teacher cache's files: .npy shards written atomically as a build goes, a progress record per
rank so that a killed build resumes, and memory-mapped reading by (epoch, dataset index).

Files of a cache directory (besides cache.json, see cache.py):
- `epoch_003.rank1.shard00002.<key>.npy`: shard 2 of rank 1's part of epoch 3, one file per key:
  `index` int32 (n,) the dataset indices of its rows, and `logits` (n, M, K) in the storage dtype,
  or with top_k = k, `values` (n, M, k), `classes` (n, M, k) int16/int32 and `fill` (n, M).
- `progress.rank1.json`: how many shards of each epoch rank 1 has finished, and the build key
  (what the shards were made for). A shard counts only once it is in the record, which is
  rewritten atomically after the shard's files, so a kill leaves at worst a shard to redo.
- `epoch_003.where.npy`: int32 (N,) each dataset index's row in epoch 3, counting the rows of
  the epoch's shards in manifest order; -1 for an index the build did not see. Written once
  every rank has finished, so readers of any world size find any row in two array lookups.

Reading opens every array with numpy's mmap_mode='r': a training process holds only the rows
of its batches, whatever the cache's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.checkpoint import atomic_write, atomic_write_text

__all__ = ["cache_bytes", "class_dtype", "describe_size", "EpochReader", "read_progress", "remove_rank_files",
           "shard_file", "write_progress", "write_shard", "write_where"]

POSITION = np.int32  # dataset indices and row numbers (a cache holds < 2**31 samples per epoch)
ITEM_BYTES = {"float16": 2, "float32": 4}


def class_dtype(num_classes: int):
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def cache_bytes(num_samples: int, members: int, num_classes: int, epochs: int = 1, *, top_k: int | None = None,
                dtype: str = "float16") -> int:
    """The bytes of array data a cache of these sizes holds (each .npy file adds a header of ~128 bytes).

    Per sample, epoch and teacher: K logits, or k values + k class ids + 1 fill value; per sample
    and epoch: its dataset index in the shard and its row in `where` (int32 each).
    """
    item = ITEM_BYTES[dtype]
    if top_k is None:
        per_member = num_classes * item
    else:
        per_member = top_k * (item + np.dtype(class_dtype(num_classes)).itemsize) + item
    return epochs * num_samples * (members * per_member + 2 * np.dtype(POSITION).itemsize)


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


def _where_file(epoch: int) -> str:
    return f"epoch_{epoch:03d}.where.npy"


def _progress_file(rank: int) -> str:
    return f"progress.rank{rank}.json"


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_shard(cache_dir: Path, epoch: int, rank: int, shard: int, arrays: dict[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        _save_npy(cache_dir / shard_file(epoch, rank, shard, key), array)


def read_progress(cache_dir: Path, rank: int) -> dict | None:
    path = cache_dir / _progress_file(rank)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_progress(cache_dir: Path, rank: int, record: dict) -> None:
    atomic_write_text(cache_dir / _progress_file(rank), json.dumps(record))


def remove_rank_files(cache_dir: Path, rank: int) -> None:
    """A fresh build of `rank`'s part: its shards (of any format) and progress record go first."""
    for path in cache_dir.glob(f"epoch_*.rank{rank}.*"):
        path.unlink()
    (cache_dir / _progress_file(rank)).unlink(missing_ok=True)


def write_where(cache_dir: Path, epoch: int, num_samples: int, shards: list[list[int]]) -> int:
    """Write epoch `epoch`'s index -> row array from its shards ([rank, shard, rows] each, in row
    order); returns how many indices no shard holds."""
    where = np.full(num_samples, -1, dtype=POSITION)
    row = 0
    for rank, shard, rows in shards:
        index = np.load(cache_dir / shard_file(epoch, rank, shard, "index"), mmap_mode="r")
        where[index] = np.arange(row, row + rows, dtype=POSITION)  # a repeated index (padding): same view, same row
        row += rows
    _save_npy(cache_dir / _where_file(epoch), where)
    return int((where < 0).sum())


# ---------------------------------------------------------------------------- reading

class EpochReader:
    """The rows of one epoch, gathered from its memory-mapped shards by dataset index."""

    def __init__(self, cache_dir: Path, epoch: int, shards: list[list[int]], keys: tuple[str, ...]):
        self.cache_dir, self.epoch, self.keys = cache_dir, epoch, keys
        self.shards = [(rank, shard) for rank, shard, _ in shards]
        self.starts = np.cumsum([0] + [rows for _, _, rows in shards])
        self.where = np.load(cache_dir / _where_file(epoch), mmap_mode="r")
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def files(self) -> list[Path]:
        return [self.cache_dir / _where_file(self.epoch)] + [
            self.cache_dir / shard_file(self.epoch, rank, shard, key) for rank, shard in self.shards for key in self.keys]

    def _array(self, shard: int, key: str) -> np.ndarray:
        found = self._maps.get((shard, key))
        if found is None:  # opened on first use: a map costs nothing until its pages are read
            rank, number = self.shards[shard]
            found = self._maps[(shard, key)] = np.load(
                self.cache_dir / shard_file(self.epoch, rank, number, key), mmap_mode="r")
        return found

    def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """{key: rows of `index`}; a ValueError names an index the cache does not hold."""
        rows = self.where[index]
        if rows.size and int(rows.min()) < 0:
            missing = int(index[np.argmin(rows)])
            raise ValueError(f"teacher cache '{self.cache_dir}' holds no logits for sample {missing} of view "
                             f"epoch {self.epoch}: the loader it was built from did not yield it")
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        local = rows - self.starts[shard]
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard):
            picked = np.nonzero(shard == s)[0]
            for key in self.keys:
                part = self._array(int(s), key)[local[picked]]
                if key not in out:
                    out[key] = np.empty((len(index), *part.shape[1:]), dtype=part.dtype)
                out[key][picked] = part
        return out
