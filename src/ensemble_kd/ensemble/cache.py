"""The teacher cache: teacher logits computed once per seeded view, stored compactly, read back in training.

A training view is a pure function of (loader seed, epoch, dataset index), so the teachers'
logits on it can be computed ahead of time. `build_cache` does that for E epochs of views,
through the loader's own `make_view` path (the pixels are the training pixels) and the teacher
set's own `outputs` (the numbers are the online numbers, up to the storage dtype).
`CachedTeachers` then answers `outputs(x, needs, index=, epoch=)` like a TeacherSet, by lookup.

Layout of a cache directory:
- `cache.json`: the manifest. Its fingerprint names what the logits depend on (each teacher's
  spec and a hash of its weights; the training data, hashed in full or as the loader describes
  it; the view parameters, mean/std and loader seed) and the storage (epochs, dtype, top_k,
  world size, batch and shard sizes, format). Rank 0 writes it when a build starts, with
  `complete: false`, and again when every rank has finished. It is not called manifest.json so
  that a cache is never mistaken for, or written over, a train-teachers run.
- the shards and progress records of `cache_store.py`, written as the build goes, so a killed
  build started again with the same settings resumes where it stopped (a different fingerprint
  or storage starts afresh). A shard is committed when it holds `shard_size` samples, or when
  COMMIT_SECONDS have passed since the last commit (a shard size larger than a rank's part must
  not leave the whole build uncommitted until its end), and at once on Ctrl-C or SIGTERM, which
  then stop the build: a kill loses at most COMMIT_SECONDS of work. Once all ranks are done, one array per key and epoch, row i =
  dataset index i, read memory-mapped.

Rank r of W computes the indices r, r+W, r+2W, ... of every epoch (nothing is computed twice),
through the loader's `batches_at(index_batches, view_epoch=e)` when it has one: the loader's own
view path, so the pixels are the training pixels (crops, flips, mixing partners all keyed by
(seed, epoch, index)). A loader without it is read in its training order,
`batches(e, view_epoch=e)`, which must then be sharded like the build (loader.rank, world_size),
and samples that order drops are not cached. Every row is keyed by `batch.index`, so a cache
built by W ranks serves any number of readers.

Top-k is lossy by design. The reconstruction puts the stored logits at their classes and `fill`
everywhere else, with fill = logsumexp(other logits) - log(K - k): then the softmax of the
reconstruction gives every top-k class exactly its true probability (the partition function is
unchanged) and spreads the remaining mass evenly over the other classes. Any loss on softmax
targets therefore differs from the online loss by how unevenly that remaining mass was spread;
at temperature T != 1 the top-k probabilities themselves are no longer exact.

What the cache does not serve: teacher taps (the cache holds logits only) and methods that
perturb their inputs (the view is no longer the cached one); both are refused with a message.

Epochs beyond the cached E reuse the views of epoch e % E: the trainer must then ask the loader
for the batches of `view_epoch(e)` (it does), so the student sees the pixels the logits belong
to. The batch order stays that of epoch e (the loader takes the view epoch apart from the order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..engine.checkpoint import atomic_write_text, read_json
from ..engine.signals import on_stop_signals
from ..methods import Needs, TeacherOutput
from ..models.inputs import input_description
from .cache_store import (EpochReader, array_damage, class_dtype, consolidate, describe_size, read_progress,
                          read_record, remove_built_files, remove_rank_files, shard_file, write_progress, write_shard)
from .teacher_set import TeacherSet

__all__ = ["CACHE_MANIFEST", "CacheMismatchError", "CacheRows", "CachedTeachers", "build_cache", "describe_kept",
           "fingerprint", "open_cache", "teacher_fingerprint"]

FORMAT = "ensemble-kd/teacher-cache/2"
CACHE_MANIFEST = "cache.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
REBUILD = "rebuild it with `ensemble-kd cache-teachers`"
COMMIT_SECONDS = 120.0  # the most computing time a kill (SIGKILL, a lost node) can take from a build
_clock = time.monotonic


class CacheMismatchError(ValueError):
    """A cache that does not belong to this run; the message names what differs."""


# ---------------------------------------------------------------------------- fingerprints

def _tensor_bytes(t: torch.Tensor):
    """The raw bytes of a tensor of any dtype (bf16 included), as a buffer hashlib can read."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _hash_state(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key, value in module.state_dict().items():
        h.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        h.update(_tensor_bytes(value))
    return h.hexdigest()


def teacher_fingerprint(teachers: TeacherSet) -> list[dict]:
    """One entry per member: its name, its architecture spec, a hash of all its state_dict bytes (whatever
    file or library they came from) and, for a member with an input adapter, the input it is given."""
    members = getattr(teachers, "source_members", None) or teachers.members  # as trained, before folding
    return [{"name": name, "spec": getattr(member, "spec", None), "weights": _hash_state(member),
             **({"input": input_description(member)} if input_description(member) else {})}
            for name, member in zip(teachers.names, members)]


def data_fingerprint(loader, dataset: str | None = None) -> dict:
    """The training set: its name when known, size, sample shape and a hash of it.

    A loader that does not hold its data (a streaming one) describes it itself with
    `fingerprint_data()` -> {"num_samples", "hash", optionally "image_shape"}; otherwise every
    byte of its `images` (or video `features`) and `labels` is hashed.
    """
    if hasattr(loader, "fingerprint_data"):
        return {"name": dataset, "image_shape": None, **loader.fingerprint_data()}
    samples = loader.images if hasattr(loader, "images") else loader.features
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(samples.shape)}:{tuple(loader.labels.shape)};".encode())
    h.update(_tensor_bytes(samples))
    h.update(_tensor_bytes(loader.labels))
    return {"name": dataset, "num_samples": int(samples.shape[0]),
            "image_shape": list(samples.shape[1:]), "hash": h.hexdigest()}


def fingerprint(teachers: TeacherSet | list[dict] | None, loader, *, dataset: str | None = None) -> dict:
    """What the cached logits depend on: the teachers, the training data and how views are made
    (what the loader's `views_fingerprint()` names, else every field of its `spec` dataclass; its
    mean/std and seed)."""
    if isinstance(teachers, TeacherSet):
        teachers = teacher_fingerprint(teachers)
    return {"format": FORMAT, "teachers": teachers, "data": data_fingerprint(loader, dataset),
            "augment": _views_fingerprint(loader),
            "mean": list(getattr(loader, "mean", ())), "std": list(getattr(loader, "std", ())), "seed": loader.seed}


def _views_fingerprint(loader) -> dict:
    if hasattr(loader, "views_fingerprint"):  # image loaders: crops, flips and mixing
        return loader.views_fingerprint()
    spec = getattr(loader, "spec", None)
    return json.loads(json.dumps(dataclasses.asdict(spec))) if spec is not None else {}  # as stored


# ---------------------------------------------------------------------------- building

def _compact(logits: torch.Tensor, dtype: torch.dtype, top_k: int | None) -> dict:
    """(B, M, K) float32 logits -> the arrays a shard stores for them (see the module docstring)."""
    if top_k is None:
        return {"logits": logits.to(dtype)}
    k_all = logits.shape[-1]
    if top_k >= k_all:
        raise ValueError(f"top_k={top_k} keeps every one of the {k_all} classes; "
                         f"leave top_k unset to store full logits")
    values, classes = logits.topk(top_k, dim=-1)
    rest = logits.scatter(-1, classes, float("-inf"))
    fill = torch.logsumexp(rest, dim=-1) - math.log(k_all - top_k)
    index_dtype = torch.int16 if class_dtype(k_all) == np.int16 else torch.int32
    return {"values": values.to(dtype), "classes": classes.to(index_dtype), "fill": fill.to(dtype)}


def _row_keys(top_k: int | None) -> tuple[str, ...]:
    return ("logits",) if top_k is None else ("values", "classes", "fill")


def _rank_batches(loader, epoch: int, rank: int, world_size: int, batch_size: int, first: int):
    """(number of batches of this rank's part of the epoch, an iterator over them from batch `first`)."""
    if hasattr(loader, "batches_at"):
        chunks = torch.arange(rank, loader.size, world_size).split(batch_size)
        return len(chunks), loader.batches_at(chunks[first:], view_epoch=epoch)
    if (loader.rank, loader.world_size) != (rank, world_size):
        raise ValueError(f"a loader without batches_at is cached in its training order, so it must be sharded like "
                         f"the build: rank {rank} of {world_size}, got {loader.rank} of {loader.world_size}")
    return len(loader), loader.batches(epoch, start=first, view_epoch=epoch)


def build_cache(teachers: TeacherSet, loader, out_dir: str | Path, *, epochs: int, dtype: str = "float16",
                top_k: int | None = None, batch_size: int | None = None, shard_size: int = 65536,
                progress=None, rank: int = 0, world_size: int = 1, dataset: str | None = None,
                report=None) -> Path:
    """Store the teachers' logits on every view (loader.seed, e, index), e < epochs, of this rank's part.

    `loader` must be the training loader the student will use (same data, views, mean/std and
    seed). `batch_size` is the inference batch (default max(1024, loader.batch_size); a loader
    without `batches_at` uses its own), `shard_size` the samples per shard file (rounded up to
    whole batches). `report(line)` is told the size on disk before any work, and what a resumed
    build skips. Run again with the same arguments after a kill, a build picks up at its first
    unfinished shard; a finished one returns at once. Rank 0 completes the manifest once every
    rank's part is written (a rank still missing is named on opening).
    """
    if not loader.train:
        raise ValueError("build_cache needs the training loader (train=True): the cache holds training views")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report or (lambda line: None)
    by_index = hasattr(loader, "batches_at")
    batch_size = (batch_size or max(1024, loader.batch_size)) if by_index else loader.batch_size
    per_shard = math.ceil(shard_size / batch_size)  # batches
    made = fingerprint(teachers, loader, dataset=dataset)
    storage = {"epochs": epochs, "dtype": dtype, "top_k": top_k, "world_size": world_size,
               "batch_size": batch_size, "batches_per_shard": per_shard, "order": "index" if by_index else "training"}
    key = hashlib.blake2b(json.dumps([made, storage], sort_keys=True).encode(), digest_size=16).hexdigest()
    manifest = read_record(out_dir / CACHE_MANIFEST)  # a damaged one is no manifest: the cache is built again
    if manifest is not None and manifest.get("key") == key and manifest.get("complete"):
        damage = built_damage(out_dir, manifest)  # what the reader would refuse, checked the same way
        if damage is None:
            report(f"cache: {out_dir} is already built for these teachers, data and settings")
            return out_dir
        report(f"cache: {damage}; building the cache again")
    manifest = {"format": FORMAT, "key": key, "complete": False, "fingerprint": made, **storage,
                "members": len(teachers), "names": list(teachers.names)}
    if rank == 0:  # a half-rewritten cache must not open under its old manifest
        atomic_write_text(out_dir / CACHE_MANIFEST, json.dumps(manifest, indent=2))
        remove_built_files(out_dir)
    record = read_progress(out_dir, rank)
    if record is None or record.get("key") != key or "batches" not in record:
        remove_rank_files(out_dir, rank)
        record = {"key": key, "rows": [[] for _ in range(epochs)], "batches": [[] for _ in range(epochs)],
                  "num_classes": teachers.num_classes, "complete": False}
    else:
        _keep_whole_shards(out_dir, rank, record, _row_keys(top_k), report)

    def report_size():
        report(describe_size(loader.size, len(teachers), record["num_classes"], epochs, top_k=top_k, dtype=dtype))
    if record["num_classes"] is not None:  # else once the first batch tells
        report_size()
    if any(record["rows"]):
        report(f"cache: resuming, {sum(map(len, record['rows']))} shards of rank {rank} already written")
    storage_dtype, needs = DTYPES[dtype], Needs(teacher_logits=True)
    task = None
    stop = _StopRequest()  # Ctrl-C and SIGTERM commit the batches computed so far, then stop the build
    with on_stop_signals(stop.request):
        for epoch in range(epochs):
            done = sum(record["batches"][epoch])  # batches of this epoch already committed
            total, batches = _rank_batches(loader, epoch, rank, world_size, batch_size, done)
            if progress is not None and task is None:
                task = progress.add_task("cache teachers", total=epochs * total, status="",
                                         images_per_step=batch_size * world_size)  # the ranks run together
            if progress is not None:
                progress.update(task, completed=epoch * total + min(total, done))
            if done >= total:
                continue
            parts: list[dict] = []
            committed = _clock()
            for batch in _until_stopped(batches, stop):
                logits = teachers.outputs(batch.x, needs).logits.transpose(0, 1)  # (B, M, K) float32
                if not bool(torch.isfinite(logits.to(storage_dtype)).all()):  # one check for NaN and fp16 overflow
                    raise ValueError(f"the teachers' logits on epoch {epoch} views are not finite in {dtype} "
                                     f"(largest magnitude {logits.abs().max().item():.4g}); check the teachers, "
                                     f"or build the cache with cache.dtype=float32 if they exceed 65504")
                if record["num_classes"] is None:
                    record["num_classes"] = int(logits.shape[-1])
                    report_size()
                parts.append({"index": batch.index.to(torch.int32),
                              **_compact(logits, storage_dtype, top_k)})
                if progress is not None:
                    progress.update(task, advance=1)
                if len(parts) == per_shard or _clock() - committed >= COMMIT_SECONDS:
                    _flush(out_dir, epoch, rank, parts, record)
                    parts, committed = [], _clock()
                if stop:
                    break
            if parts:
                _flush(out_dir, epoch, rank, parts, record)
            if stop:
                raise KeyboardInterrupt  # what was computed is committed: a resume starts after it
    record["complete"] = True
    write_progress(out_dir, rank, record)
    distributed.barrier()  # every rank's shards exist before the manifest says the cache is whole
    if rank == 0:
        _complete(out_dir, manifest, loader.size)
    distributed.barrier()  # no rank reads the cache before it is whole
    return out_dir


def _keep_whole_shards(out_dir: Path, rank: int, record: dict, keys: tuple[str, ...], report) -> None:
    """Trust the recorded shards of each epoch up to the first one missing or damaged (deleted, cut by
    a copy): that one and those after it are computed again, as if the build had stopped there."""
    for epoch, rows in enumerate(record["rows"]):
        for shard, count in enumerate(rows):
            damage = next((d for d in (array_damage(out_dir / shard_file(epoch, rank, shard, k), count)
                                       for k in ("index", *keys)) if d is not None), None)
            if damage is not None:
                report(f"cache: {damage}; computing epoch {epoch} of rank {rank} again from shard {shard}")
                del rows[shard:]
                del record["batches"][epoch][shard:]
                record["complete"] = False
                break


def built_damage(cache_dir: Path, manifest: dict) -> str | None:
    """The first gathered array of a complete cache that is missing or damaged, in words; None if whole."""
    num_samples = manifest["fingerprint"]["data"]["num_samples"]
    keys = _row_keys(manifest["top_k"])
    return next((d for d in (EpochReader(cache_dir, e, keys).damage(num_samples) for e in range(manifest["epochs"]))
                 if d is not None), None)


def _flush(out_dir: Path, epoch: int, rank: int, parts: list[dict], record: dict) -> None:
    """Write one shard, then record it (its rows and batches): the record is what a resumed build trusts."""
    arrays = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    write_shard(out_dir, epoch, rank, len(record["rows"][epoch]), arrays)
    record["rows"][epoch].append(len(arrays["index"]))
    record["batches"][epoch].append(len(parts))
    write_progress(out_dir, rank, record)


def _until_stopped(batches, stop):
    """The batches, ending early when a stop was requested and the loader then fails (its worker
    processes got the same Ctrl-C): what was computed is still committed."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception:
            if stop:
                return
            raise
        yield batch


class _StopRequest:
    """Set by Ctrl-C or SIGTERM while a build runs; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False

    def __bool__(self) -> bool:
        return self.requested

    def request(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def describe_kept(cache_dir: str | Path) -> str | None:
    """What a stopped build leaves for a resume, in a clause ("3 shards holding 1,536 of 2,426 views are
    kept"); None when `cache_dir` holds no cache build."""
    cache_dir = Path(cache_dir)
    manifest = read_record(cache_dir / CACHE_MANIFEST)
    if manifest is None or "key" not in manifest:
        return None
    if manifest.get("complete"):
        return "the cache is complete"
    records = [r for r in (read_record(p) for p in sorted(cache_dir.glob("progress.rank*.json")))
               if r is not None and r.get("key") == manifest["key"]]
    shards = sum(len(rows) for r in records for rows in r.get("rows", []))
    views = sum(sum(rows) for r in records for rows in r.get("rows", []))
    try:
        total = manifest["epochs"] * manifest["fingerprint"]["data"]["num_samples"]
    except (KeyError, TypeError):
        total = None
    if not shards:
        return "no shard was committed yet, so nothing is kept"
    of = f" of {total:,}" if total else ""
    return f"{shards} shard{'s' * (shards != 1)} holding {views:,}{of} teacher views are kept"


def _complete(out_dir: Path, manifest: dict, num_samples: int) -> None:
    """Once every rank's record says it finished this build: each epoch's shards gathered into one
    array per key, the manifest marked complete, the shards removed. Otherwise the manifest stays
    incomplete (a rank is still running, or was stopped)."""
    world_size = manifest["world_size"]
    records = [read_progress(out_dir, r) for r in range(world_size)]
    if not all(r is not None and r["key"] == manifest["key"] and r["complete"] for r in records):
        return
    keys = _row_keys(manifest["top_k"])
    missing = [consolidate(out_dir, e, num_samples, [(r, s) for r, rec in enumerate(records)
                                                     for s in range(len(rec["rows"][e]))], keys)
               for e in range(manifest["epochs"])]
    num_classes = next(r["num_classes"] for r in records if r["num_classes"] is not None)
    manifest = {**manifest, "complete": True, "num_classes": num_classes, "missing": missing}
    atomic_write_text(out_dir / CACHE_MANIFEST, json.dumps(manifest, indent=2))
    remove_rank_files(out_dir)  # the gathered arrays hold everything now (stale ranks of an older build too)


# ---------------------------------------------------------------------------- checking

def _describe_data(d: dict) -> str:
    name = f"dataset '{d['name']}'" if d.get("name") else "a dataset"
    shape = f" of shape {tuple(d['image_shape'])}" if d.get("image_shape") else ""
    return f"{name} ({d['num_samples']} training samples{shape}, contents {d['hash'][:12]})"


def _items(d: dict, keys) -> str:
    return ", ".join(f"{k}={d.get(k)}" for k in keys)


def _difference(made: dict, now: dict) -> tuple[str, str] | None:
    """(what the cache was made for, what this run uses) for the first thing that differs, or None."""
    if made.get("format") != now["format"]:
        return f"format {made.get('format')}", f"format {now['format']}"
    a, b = made["data"], now["data"]
    if (a["num_samples"], a.get("image_shape"), a["hash"]) != (b["num_samples"], b.get("image_shape"), b["hash"]) or (
            a.get("name") and b.get("name") and a["name"] != b["name"]):
        return _describe_data(a), _describe_data(b)
    keys = [k for k in {**made["augment"], **now["augment"]} if made["augment"].get(k) != now["augment"].get(k)]
    if keys:
        return f"augmentation {_items(made['augment'], keys)}", _items(now["augment"], keys)
    keys = [k for k in ("mean", "std") if made[k] != now[k]]
    if keys:
        return f"normalisation {_items(made, keys)}", _items(now, keys)
    if made["seed"] != now["seed"]:
        return f"the views of loader seed {made['seed']}", f"seed {now['seed']}"
    if now["teachers"] is None:  # not checked: the run did not load its teachers
        return None
    ta, tb = made["teachers"], now["teachers"]
    if len(ta) != len(tb):
        return f"{len(ta)} teachers", f"{len(tb)}"
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x["spec"] != y["spec"]:
            return f"teacher {i} with architecture {x['spec']}", f"{y['spec']}"
        if x.get("input") != y.get("input"):  # the adapter's buffers are in the weights' hash, its size is not
            return f"teacher {i} ({x['name']}) given input {x.get('input')}", f"input {y.get('input')}"
        if x["weights"] != y["weights"]:
            return f"teacher {i} ({x['name']}) with weights {x['weights'][:12]}", f"weights {y['weights'][:12]}"
    return None


def _check_needs(needs: Needs, where: str) -> None:
    if needs.teacher_taps:
        raise ValueError(f"the method needs teacher taps {list(needs.teacher_taps)} but the teacher cache "
                         f"{where} serves logits only; drop teachers.cache to run the teachers online")
    if needs.teacher_bn != "eval":
        raise ValueError(f"the method runs the teachers with BatchNorm in {needs.teacher_bn} mode, and the "
                         f"teacher cache {where} holds eval-mode logits; drop teachers.cache or set teacher_bn=eval")
    if needs.perturbs_inputs:
        raise ValueError(f"the method perturbs its inputs, so the teacher cache {where} (logits of unperturbed "
                         f"views) cannot serve it; drop teachers.cache to run the teachers online")


# ---------------------------------------------------------------------------- reading

class CachedTeachers:
    """Teacher logits read from a cache: the TeacherSet interface (`outputs`, `num_classes`, `len`, `names`).

    The arrays stay on disk, memory-mapped. A lookup has two halves: `rows` gathers a batch's rows
    on the host (`row_source()` does it in a loader's worker or thread, which then ships the rows
    with the batch, copied to the device without waiting), and `logits_from_rows` turns them into
    float32 logits where they are. `outputs(..., rows=)` takes rows so shipped; without them it
    looks the indices up itself, on the calling thread.
    """

    def __init__(self, cache_dir: str | Path, manifest: dict, device: torch.device):
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.epochs: int = manifest["epochs"]
        self.top_k: int | None = manifest["top_k"]
        self.names: list[str] = list(manifest["names"])
        self._num_classes: int | None = manifest["num_classes"]
        self.device = device
        keys = _row_keys(self.top_k)
        self._epochs = [EpochReader(self.cache_dir, e, keys) for e in range(self.epochs)]

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def __len__(self) -> int:
        return len(self.names)

    def view_epoch(self, epoch: int) -> int:
        """The epoch whose views (and logits) training epoch `epoch` uses: epoch % E."""
        return epoch % self.epochs

    def check(self, needs: Needs) -> None:
        """Refuse a method the cache cannot serve (taps, perturbed inputs)."""
        _check_needs(needs, f"'{self.cache_dir}'")

    def row_source(self) -> CacheRows:
        """What a loader calls to gather the rows of each batch's views off the main thread."""
        return CacheRows(self._epochs)

    def rows(self, index, epoch: int) -> dict[str, torch.Tensor]:
        """The stored rows of the views (epoch % E, index), on the host (index: ints or a host tensor)."""
        return CacheRows(self._epochs)(index, epoch)

    @torch.no_grad()
    def logits_from_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """(M, B, K) float32 logits from a batch's rows, on the rows' device."""
        if self.top_k is None:
            out = rows["logits"].float()
        else:
            fill = rows["fill"].float()  # (B, M)
            out = fill.unsqueeze(-1).expand(*fill.shape, self._num_classes).clone()
            out.scatter_(-1, rows["classes"].long(), rows["values"].float())
        return out.transpose(0, 1).contiguous()

    @torch.no_grad()
    def logits(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """(M, B, K) float32 logits of the views (epoch % E, index), on the cache's device."""
        return self.logits_from_rows(_to_device(self.rows(index, epoch), self.device))

    def outputs(self, x: torch.Tensor, needs: Needs, *, index=None, epoch=None, members=None,
                rows: dict[str, torch.Tensor] | None = None) -> TeacherOutput:
        """The cached logits for the views the batch was made from; `x` itself is not read.
        `rows`: the batch's rows as its loader shipped them (then `index` and `epoch` are not read);
        `members` (indices) selects those teachers, in that order; None gives all."""
        self.check(needs)
        if rows is None and (index is None or epoch is None):
            raise ValueError("cached teachers need the batch's dataset indices and its epoch (index=, epoch=)")
        logits = None
        if needs.teacher_logits:
            if rows is None:
                logits = self.logits(index, epoch)
            else:
                logits = self.logits_from_rows(_to_device(rows, x.device))
            if members is not None:  # views stacked: an index tensor would be copied to the device and waited for
                logits = torch.stack([logits[int(m)] for m in members])
            logits = logits.to(x.device, non_blocking=True)
        return TeacherOutput(logits, {})


class CacheRows:
    """rows(index, view_epoch) -> {key: host tensor of the views' rows}: the gather of a cache lookup.

    A loader calls it in its worker processes or a thread. Pickled, it reopens the memory maps
    where it lands (a memory map pickles as its whole contents)."""

    def __init__(self, readers: list[EpochReader]):
        self.readers = readers

    def __call__(self, index, view_epoch: int) -> dict[str, torch.Tensor]:
        idx = np.asarray(index.cpu().numpy() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        rows = self.readers[int(view_epoch) % len(self.readers)].gather(idx)
        return {k: torch.from_numpy(v) for k, v in rows.items()}


def _to_device(rows: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    # pinned rows (a loader's) are copied while the host goes on; pageable ones are staged first
    return {k: v.to(device, non_blocking=True) for k, v in rows.items()}


def open_cache(cache_dir: str | Path, teachers: TeacherSet | list[dict] | None, loader,
               device: str | torch.device | None = None, *, dataset: str | None = None,
               needs: Needs | None = None) -> CachedTeachers:
    """Open a cache after checking it was made for this data, views, seed and (when given) teachers.

    `teachers` may be the TeacherSet itself, its `teacher_fingerprint`, or None to skip that check
    (the distill path does not load teachers). `dataset` names the data when the caller knows it.
    A mismatch raises CacheMismatchError with one sentence naming what differs.
    """
    cache_dir = Path(cache_dir)
    where = f"'{cache_dir}'"
    if needs is not None:
        _check_needs(needs, where)
    path = cache_dir / CACHE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{where} has no {CACHE_MANIFEST}: it is not a finished teacher cache; "
                                f"build one with `ensemble-kd cache-teachers CONFIG cache.dir={cache_dir}`")
    manifest = read_json(path, REBUILD, keys=("fingerprint", "complete", "epochs", "top_k", "names"))
    if isinstance(teachers, TeacherSet):
        teachers = teacher_fingerprint(teachers)
    try:
        found = _difference(manifest["fingerprint"], fingerprint(teachers, loader, dataset=dataset))
    except (KeyError, TypeError, AttributeError):  # valid JSON of another shape
        raise ValueError(f"'{path}' is damaged (its fingerprint is not one a build writes); {REBUILD}") from None
    if found is not None:
        made, now = found
        raise CacheMismatchError(f"cache {where} was made for {made} but this run uses {now}; {REBUILD}")
    if not manifest.get("complete"):
        raise FileNotFoundError(f"teacher cache {where} is incomplete (its build stopped, or a rank has not "
                                f"finished); run the same cache-teachers command again to resume it")
    device = torch.device(device) if device is not None else loader.device
    damage = built_damage(cache_dir, manifest)
    if damage is not None:
        raise FileNotFoundError(f"teacher cache {where} is incomplete: {damage}; {REBUILD}")
    cached = CachedTeachers(cache_dir, manifest, device)
    for reader in cached._epochs:
        reader.open()
    return cached
