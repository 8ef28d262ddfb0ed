"""The teacher cache: teacher logits computed once per seeded view, stored compactly, read back in training.

A training view is a pure function of (loader seed, epoch, dataset index), so the teachers'
logits on it can be computed ahead of time. `build_cache` does that for E epochs of views,
through the loader's own `make_view` path (the pixels are the training pixels) and the teacher
set's own `outputs` (the numbers are the online numbers, up to the storage dtype).
`CachedTeachers` then answers `outputs(x, needs, index=, epoch=)` like a TeacherSet, by lookup.

Layout of a cache directory:
- `cache.json`: the manifest. Its fingerprint names what the logits depend on (each teacher's
  spec and a hash of its weights; the training images and labels, hashed in full; the
  augmentation, mean/std and loader seed) and the storage (epochs, dtype, top_k, format).
  It is not called manifest.json so that a cache is never mistaken for, or written over, a
  train-teachers run, whose manifest.json lists members.
- `epoch_003.rank0.pt`: one file per (epoch, shard), written atomically. Shard r holds the
  dataset indices r, r+W, r+2W, ... (W = world_size, DistributedSampler without shuffling):
  `index` int64 (N_r,) ascending, and either `logits` (N_r, M, K) in the storage dtype, or,
  with top_k = k, `values` (N_r, M, k) (the k largest logits), `classes` (N_r, M, k)
  int16/int32 and `fill` (N_r, M).

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

import hashlib
import json
import math
from pathlib import Path

import torch

from ..data import DeviceLoader, make_view
from ..engine.checkpoint import atomic_save, atomic_write_text, load
from ..engine import distributed
from ..methods import Needs, TeacherOutput
from ..models.inputs import input_description
from .teacher_set import TeacherSet

__all__ = ["CACHE_MANIFEST", "CacheMismatchError", "CachedTeachers", "build_cache", "fingerprint",
           "open_cache", "teacher_fingerprint"]

FORMAT = "ensemble-kd/teacher-cache/1"
CACHE_MANIFEST = "cache.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
REBUILD = "rebuild it with `ensemble-kd cache-teachers`"


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


def data_fingerprint(loader: DeviceLoader, dataset: str | None = None) -> dict:
    """The training set: its name when known, size, image shape and a hash of every image and label byte."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(loader.images.shape)}:{tuple(loader.labels.shape)};".encode())
    h.update(_tensor_bytes(loader.images))
    h.update(_tensor_bytes(loader.labels))
    return {"name": dataset, "num_samples": int(loader.images.shape[0]),
            "image_shape": list(loader.images.shape[1:]), "hash": h.hexdigest()}


def fingerprint(teachers: TeacherSet | list[dict] | None, loader: DeviceLoader, *, dataset: str | None = None) -> dict:
    """What the cached logits depend on: the teachers, the training data and how views are made."""
    if isinstance(teachers, TeacherSet):
        teachers = teacher_fingerprint(teachers)
    return {"format": FORMAT, "teachers": teachers, "data": data_fingerprint(loader, dataset),
            "augment": {"crop_padding": loader.spec.crop_padding, "flip": loader.spec.flip},
            "mean": list(loader.mean), "std": list(loader.std), "seed": loader.seed}


# ---------------------------------------------------------------------------- building

def _shard_file(epoch: int, rank: int) -> str:
    return f"epoch_{epoch:03d}.rank{rank}.pt"


def _compact(logits: torch.Tensor, dtype: torch.dtype, top_k: int | None) -> dict:
    """(B, M, K) float32 logits -> the tensors a shard stores for them (see the module docstring)."""
    if top_k is None:
        return {"logits": logits.to(dtype)}
    k_all = logits.shape[-1]
    if top_k >= k_all:
        raise ValueError(f"top_k={top_k} keeps every one of the {k_all} classes; "
                         f"leave top_k unset to store full logits")
    values, classes = logits.topk(top_k, dim=-1)
    rest = logits.scatter(-1, classes, float("-inf"))
    fill = torch.logsumexp(rest, dim=-1) - math.log(k_all - top_k)
    index_dtype = torch.int16 if k_all <= torch.iinfo(torch.int16).max else torch.int32
    return {"values": values.to(dtype), "classes": classes.to(index_dtype), "fill": fill.to(dtype)}


def build_cache(teachers: TeacherSet, loader: DeviceLoader, out_dir: str | Path, *, epochs: int,
                dtype: str = "float16", top_k: int | None = None, batch_size: int | None = None,
                progress=None, rank: int = 0, world_size: int = 1, dataset: str | None = None) -> Path:
    """Store the teachers' logits on every view (loader.seed, e, index), e < epochs, of this rank's shard.

    `loader` must be the training loader the student will use (same data, augmentation, mean/std
    and seed). `batch_size` is the inference batch (default max(1024, loader.batch_size)). Rank r
    writes the indices r::world_size of every epoch; rank 0 also writes the manifest, after its
    shards, so a cache opens only once it is written (a missing shard is named on opening).
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # a half-rewritten cache must not open under its old manifest
        (out_dir / CACHE_MANIFEST).unlink(missing_ok=True)
    batch_size = batch_size or max(1024, loader.batch_size)
    storage = DTYPES[dtype]
    needs = Needs(teacher_logits=True)
    index = torch.arange(rank, len(loader.labels), world_size, device=loader.device)
    batches = math.ceil(len(index) / batch_size)
    task = None
    if progress is not None:
        task = progress.add_task("cache teachers", total=epochs * batches, status="")
    for epoch in range(epochs):
        parts: list[dict] = []
        for start in range(0, len(index), batch_size):
            idx = index[start:start + batch_size]
            # The loader's own view path: the same pixels DeviceLoader.batches yields for (seed, epoch, idx).
            x = make_view(loader.images, idx, epoch=epoch, seed=loader.seed, spec=loader.spec,
                          mean=loader.mean, std=loader.std)
            logits = teachers.outputs(x, needs).logits.transpose(0, 1)  # (B, M, K) float32
            num_classes = logits.shape[-1]
            if not bool(torch.isfinite(logits.to(storage)).all()):  # one check for NaN and fp16 overflow
                raise ValueError(f"the teachers' logits on epoch {epoch} views are not finite in {dtype} "
                                 f"(largest magnitude {logits.abs().max().item():.4g}); check the teachers, "
                                 f"or build the cache with cache.dtype=float32 if they exceed 65504")
            parts.append({k: v.cpu() for k, v in _compact(logits, storage, top_k).items()})
            if progress is not None:
                progress.update(task, advance=1)
        shard = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        atomic_save({"format": FORMAT, "epoch": epoch, "rank": rank, "world_size": world_size,
                     "index": index.cpu(), **shard}, out_dir / _shard_file(epoch, rank))
    distributed.barrier()  # every rank's shards exist before the manifest says the cache is whole
    if rank == 0:
        manifest = {"fingerprint": fingerprint(teachers, loader, dataset=dataset),
                    "epochs": epochs, "dtype": dtype, "top_k": top_k, "world_size": world_size,
                    "num_classes": num_classes, "members": len(teachers), "names": list(teachers.names),
                    "files": [_shard_file(e, r) for e in range(epochs) for r in range(world_size)]}
        atomic_write_text(out_dir / CACHE_MANIFEST, json.dumps(manifest, indent=2))
    return out_dir


# ---------------------------------------------------------------------------- checking

def _describe_data(d: dict) -> str:
    name = f"dataset '{d['name']}'" if d.get("name") else "a dataset"
    return f"{name} ({d['num_samples']} training samples of shape {tuple(d['image_shape'])}, contents {d['hash'][:12]})"


def _items(d: dict, keys) -> str:
    return ", ".join(f"{k}={d[k]}" for k in keys)


def _difference(made: dict, now: dict) -> tuple[str, str] | None:
    """(what the cache was made for, what this run uses) for the first thing that differs, or None."""
    if made.get("format") != now["format"]:
        return f"format {made.get('format')}", f"format {now['format']}"
    a, b = made["data"], now["data"]
    if (a["num_samples"], a["image_shape"], a["hash"]) != (b["num_samples"], b["image_shape"], b["hash"]) or (
            a.get("name") and b.get("name") and a["name"] != b["name"]):
        return _describe_data(a), _describe_data(b)
    keys = [k for k in now["augment"] if made["augment"].get(k) != now["augment"][k]]
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

    Every epoch is held in memory on `device` in the storage dtype (N*M*K*2 bytes per epoch in
    float16: 6 MB for Fashion-MNIST and 5 teachers); `outputs` converts the batch to float32.
    """

    def __init__(self, cache_dir: str | Path, manifest: dict, tensors: dict[str, torch.Tensor]):
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.epochs: int = manifest["epochs"]
        self.top_k: int | None = manifest["top_k"]
        self.names: list[str] = list(manifest["names"])
        self._num_classes: int | None = manifest["num_classes"]
        self._tensors = tensors  # each (E, N, M, ...) on the device
        self.device = next(iter(tensors.values())).device

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

    @torch.no_grad()
    def logits(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """(M, B, K) float32 logits of the views (epoch % E, index)."""
        t, e = self._tensors, self.view_epoch(int(epoch))
        idx = torch.as_tensor(index, dtype=torch.int64).to(self.device).reshape(-1)
        if self.top_k is None:
            out = t["logits"][e].index_select(0, idx).float()
        else:
            fill = t["fill"][e].index_select(0, idx).float()  # (B, M)
            out = fill.unsqueeze(-1).expand(*fill.shape, self._num_classes).clone()
            out.scatter_(-1, t["classes"][e].index_select(0, idx).long(), t["values"][e].index_select(0, idx).float())
        return out.transpose(0, 1).contiguous()

    def outputs(self, x: torch.Tensor, needs: Needs, *, index=None, epoch=None, members=None) -> TeacherOutput:
        """The cached logits for the views the batch was made from; `x` itself is not read.
        `members` (indices) selects those teachers, in that order; None gives all."""
        self.check(needs)
        if index is None or epoch is None:
            raise ValueError("cached teachers need the batch's dataset indices and its epoch (index=, epoch=)")
        logits = None
        if needs.teacher_logits:
            logits = self.logits(index, epoch)
            if members is not None:
                logits = logits[torch.as_tensor(list(members), dtype=torch.int64, device=logits.device)]
            logits = logits.to(x.device)
        return TeacherOutput(logits, {})


def open_cache(cache_dir: str | Path, teachers: TeacherSet | list[dict] | None, loader: DeviceLoader,
               device: str | torch.device | None = None, *, dataset: str | None = None,
               needs: Needs | None = None) -> CachedTeachers:
    """Open a cache after checking it was made for this data, augmentation, seed and (when given) teachers.

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
    manifest = json.loads(path.read_text())
    if isinstance(teachers, TeacherSet):
        teachers = teacher_fingerprint(teachers)
    found = _difference(manifest["fingerprint"], fingerprint(teachers, loader, dataset=dataset))
    if found is not None:
        made, now = found
        raise CacheMismatchError(f"cache {where} was made for {made} but this run uses {now}; {REBUILD}")
    device = torch.device(device) if device is not None else loader.device
    return CachedTeachers(cache_dir, manifest, _read_shards(cache_dir, manifest, device))


def _read_shards(cache_dir: Path, manifest: dict, device: torch.device) -> dict[str, torch.Tensor]:
    n = manifest["fingerprint"]["data"]["num_samples"]
    epochs, world_size = manifest["epochs"], manifest["world_size"]
    tensors: dict[str, torch.Tensor] = {}
    for epoch in range(epochs):
        seen = torch.zeros(n, dtype=torch.bool)
        for rank in range(world_size):
            file = cache_dir / _shard_file(epoch, rank)
            if not file.is_file():
                raise FileNotFoundError(f"teacher cache '{cache_dir}' is incomplete: {file.name} is missing; {REBUILD}")
            shard = load(file)
            if not isinstance(shard, dict) or shard.get("format") != FORMAT or shard.get("epoch") != epoch:
                raise ValueError(f"'{file}' is not epoch {epoch} of an ensemble-kd teacher cache; {REBUILD}")
            index = shard["index"]
            for key in ("logits", "values", "classes", "fill"):
                if key not in shard:
                    continue
                if key not in tensors:
                    tensors[key] = torch.empty((epochs, n, *shard[key].shape[1:]), dtype=shard[key].dtype)
                tensors[key][epoch].index_copy_(0, index, shard[key])
            seen[index] = True
        if not bool(seen.all()):
            raise ValueError(f"teacher cache '{cache_dir}' misses {int((~seen).sum())} samples of epoch {epoch}; "
                             f"{REBUILD}")
    return {k: v.to(device) for k, v in tensors.items()}
