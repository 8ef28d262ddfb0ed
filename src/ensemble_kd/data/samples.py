"""Image datasets listed, not decoded: image folders and WebDataset-style tar shards, read by index.

A `Samples` holds, per sample, where its encoded bytes are and its label, in flat numpy arrays
(names as one byte blob plus offsets), so that memory is a few dozen bytes per sample and loader
workers forked from the main process never copy Python objects page by page. Listing reads
directory entries and tar headers only; images are decoded later, in loader workers.

Tar shards follow the WebDataset layout: `root/<split>/*.tar`, members `<key>.<image ext>` and
`<key>.cls` (the class index as text) side by side. Each shard's member offsets are read when it
is listed, by walking its headers with `tarfile` (no data is read but the small .cls members), and
kept in memory; they are also stored in the index cache (index_cache.py), so a later process or
rank listing the unchanged shard (same size and mtime) reads them back instead of walking it. A
sample's bytes are then one seek and one read, so any index can be read at any time, which is
what seeded views need (a sequential tar stream, as webdataset's, cannot replay a view).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from .formats import IMAGE_EXTENSIONS
from .index_cache import cached_index

__all__ = ["DecodeError", "ImageFiles", "TarSamples", "list_image_folder", "list_image_split", "list_shard_split",
           "list_tar_shards", "own_val_dir", "Samples"]

LISTING_REPORT_EVERY = 100_000  # listing a large folder prints a progress line every this many files


class DecodeError(ValueError):
    """An image that cannot be decoded; the message names the file."""


def _blob(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


class Samples:
    """N samples: names (for messages), labels int64, class names; subclasses read the bytes."""

    def __init__(self, names: Sequence[str] | tuple[np.ndarray, np.ndarray], labels, classes, image_size: int):
        self._names, self._offsets = names if isinstance(names, tuple) else _blob(names)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self.size = int(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3  # every mode is converted to RGB as it is decoded

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    def name(self, i: int) -> str:
        """The sample's file (folders) or shard:key (tar shards), relative to the split's root."""
        return self._names[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def describe(self, i: int) -> str:
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def _take(self, idx: np.ndarray):
        names = [self.name(int(i)) for i in idx]
        return _blob(names), self.labels[idx]

    def digest(self) -> str:
        """A hash of the listing (names, labels, byte sizes): what the teacher cache's fingerprint names."""
        h = hashlib.blake2b(digest_size=16)
        for part in self._digest_parts():
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()

    def _digest_parts(self):
        return self._names, self._offsets, self.labels


class ImageFiles(Samples):
    """Image files under `root`, named relative to it."""

    def __init__(self, root: Path, names, labels, classes, image_size: int, sizes=None):
        super().__init__(names, labels, classes, image_size)
        self.root = Path(root)
        self.sizes = np.zeros(len(self.labels), np.int64) if sizes is None else np.asarray(sizes, np.int64)

    def describe(self, i: int) -> str:
        return str(self.root / self.name(i))

    def read(self, i: int) -> bytes:
        with open(self.root / self.name(i), "rb") as f:
            return f.read()

    def subset(self, indices) -> ImageFiles:
        idx = np.asarray(indices, dtype=np.int64)
        names, labels = self._take(idx)
        return ImageFiles(self.root, names, labels, self.classes, self.size, self.sizes[idx])

    def _digest_parts(self):
        return (*super()._digest_parts(), self.sizes)


class TarSamples(Samples):
    """Members of tar shards: shard number, data offset and size of each sample's image member."""

    def __init__(self, shards: Sequence[Path], names, labels, classes, image_size: int, shard, offset, nbytes):
        super().__init__(names, labels, classes, image_size)
        self.shards = [Path(s) for s in shards]
        self.shard, self.offset, self.nbytes = (np.asarray(a, np.int64) for a in (shard, offset, nbytes))
        self._files: dict[tuple[int, int], object] = {}  # (pid, shard) -> open file: one per worker process

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def describe(self, i: int) -> str:
        shard = self.shards[int(self.shard[i])]
        return f"{self.name(i)} in {shard}"

    def read(self, i: int) -> bytes:
        key = (os.getpid(), int(self.shard[i]))
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = open(self.shards[key[1]], "rb")
        f.seek(int(self.offset[i]))
        return f.read(int(self.nbytes[i]))

    def subset(self, indices) -> TarSamples:
        idx = np.asarray(indices, dtype=np.int64)
        names, labels = self._take(idx)
        return TarSamples(self.shards, names, labels, self.classes, self.size,
                          self.shard[idx], self.offset[idx], self.nbytes[idx])

    def _digest_parts(self):
        names = "\n".join(s.name for s in self.shards).encode()
        return (*super()._digest_parts(), np.frombuffer(names, np.uint8), self.shard, self.offset, self.nbytes)


# ----------------------------------------------------------------------------- image folders

def _report(what: str, count: int) -> None:
    print(f"listing {what}: {count} files so far", file=sys.stderr, flush=True)


def _list_split(split_dir: Path, classes: list[str], root: Path) -> tuple[list[str], list[int], list[int]]:
    names, labels, sizes = [], [], []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue  # an eval split may lack a class
        found = 0
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                names.append(f"{split_dir.name}/{cls}/{entry.name}")
                labels.append(label)
                sizes.append(entry.stat().st_size)
                found += 1
                if len(names) % LISTING_REPORT_EVERY == 0:
                    _report(str(split_dir), len(names))
        if not found:
            raise ValueError(f"class folder {folder} is empty: it holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                             f"add images or remove the folder.")
    return names, labels, sizes


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_split_dir(root: Path, kind: str) -> Path:
    """root/test, or root/val when there is no test/ (ImageNet's layout); with both, root/val is the
    validation split temperature scaling uses (own_val_dir), else it is carved from train (data.val_fraction)."""
    layout = "root/train/... and root/test/... (or root/val/...)"
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root / 'train'} not found: a {kind} dataset needs {layout}.")
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root} has neither test/ nor val/: a {kind} dataset needs {layout}.")


def own_val_dir(root: Path) -> Path | None:
    """root/val when root/test is the test split (image folders and tar shards): the dataset's own validation
    split, which temperature scaling uses instead of data.val_fraction of train (images pretrained teachers
    may have learnt)."""
    return root / "val" if (root / "test").is_dir() and (root / "val").is_dir() else None


def list_image_folder(root: str | Path, image_size: int) -> tuple[ImageFiles, ImageFiles]:
    """(train, test) file lists of root/train/<class>/* and root/test/<class>/* (or root/val/)."""
    root = Path(root).expanduser()
    test_dir = test_split_dir(root, "image folder")
    classes = _class_folders(root / "train")
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders; an image folder dataset needs "
                         f"root/train/<class>/<images>.")
    return (list_image_split(root, root / "train", classes, image_size),
            list_image_split(root, test_dir, classes, image_size))


def list_image_split(root: Path, split_dir: Path, classes, image_size: int) -> ImageFiles:
    """The files of split_dir/<class>/*, labelled by `classes` (the training split's class folders)."""
    extra = [c for c in _class_folders(split_dir) if c not in classes]
    if extra:
        raise ValueError(f"{split_dir} has class folders {extra} that {root / 'train'} lacks; every "
                         f"{split_dir.name} class needs training images (add them, or remove the folders).")
    names, labels, sizes = _list_split(split_dir, list(classes), root)
    if not names:
        raise ValueError(f"{split_dir} holds no images; put images in {split_dir}/<class>/.")
    return ImageFiles(root, names, labels, classes, image_size, sizes)


# ----------------------------------------------------------------------------- tar shards

SHARD_INDEX_FIELDS = {"names": np.uint8, "name_offsets": np.int64, "labels": np.int64, "offsets": np.int64,
                      "sizes": np.int64}  # one shard's samples, names as a blob: what the index cache stores


def _shard_index_holds(index: dict[str, np.ndarray], file_size: int) -> bool:
    """Whether a stored shard index is self-consistent: one label, offset and size per name, the
    names blob cut into non-empty names, every member's bytes inside a file of this size."""
    n, cuts = len(index["labels"]), index["name_offsets"]
    return (len(index["offsets"]) == len(index["sizes"]) == n and len(cuts) == n + 1 and n > 0
            and cuts[0] == 0 and cuts[-1] == len(index["names"]) and bool(np.all(np.diff(cuts) > 0))
            and bool(np.all(index["labels"] >= 0)) and bool(np.all(index["sizes"] >= 0))
            and bool(np.all(index["offsets"] >= 0)) and bool(np.all(index["offsets"] + index["sizes"] <= file_size)))


def _index_shard(path: Path) -> dict[str, np.ndarray]:
    """The shard's samples (names blob, labels, data offsets and sizes), from its headers and .cls members."""
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    others: dict[str, str] = {}  # key -> a member of it that is neither image nor label, for messages
    last = None
    try:
        with tarfile.open(path, mode="r:") as tar:  # uncompressed only: compressed members have no offsets
            try:
                for member in tar:
                    last = member
                    if not member.isfile() or os.path.basename(member.name).startswith("."):
                        continue
                    key, ext = os.path.splitext(member.name)
                    ext = ext.lower()
                    if ext == ".cls":
                        _no_duplicate(labels, key, member.name, path)
                        labels[key] = _class_index(tar, member, path)
                    elif ext in IMAGE_EXTENSIONS:
                        _no_duplicate(images, key, member.name, path)
                        images[key] = (member.name, member.offset_data, member.size)
                    else:
                        others.setdefault(key, member.name)
            except tarfile.ReadError as err:
                if str(err) == "unexpected end of data" and last is not None:
                    raise ValueError(_truncated(path, _runs_to(last))) from None
                raise
            _check_end(path, tar.offset)
    except tarfile.ReadError as err:
        raise ValueError(f"{path} is not an uncompressed tar file ({err}); tar shards must be plain .tar.") from None
    if last is not None and last.offset_data + last.size > os.path.getsize(path):  # cut in the last member
        raise ValueError(_truncated(path, _runs_to(last)))
    if not images:
        raise ValueError(f"tar shard {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove it.")
    for key in sorted(labels):
        if key not in images:
            found = f" (its other member {others[key]} is not an image: {', '.join(IMAGE_EXTENSIONS)})" \
                if key in others else ""
            raise ValueError(f"{key}.cls in tar shard {path} has no image beside it{found}; add the sample's "
                             f"image or remove its label.")
    keys = sorted(images)
    for key in keys:
        if key not in labels:
            raise ValueError(f"{images[key][0]} in tar shard {path} has no label: add {key}.cls (its class "
                             f"index) beside it; every sample needs one.")
    names, name_offsets = _blob([images[k][0] for k in keys])
    return {"names": names, "name_offsets": name_offsets, "labels": [labels[k] for k in keys],
            "offsets": [images[k][1] for k in keys], "sizes": [images[k][2] for k in keys]}


def _class_index(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> int:
    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{member.name} in {path} holds {text[:20]!r}, not a class index; "
                         f"a .cls member is the sample's class as an integer.") from None


def _no_duplicate(seen: dict, key: str, name: str, path: Path) -> None:
    """A second image or label of one sample key would silently replace the first: refused."""
    if key in seen:
        first = seen[key][0] if isinstance(seen[key], tuple) else f"{key}.cls"
        raise ValueError(f"tar shard {path} holds sample {key!r} twice ({first} and {name}); each key must "
                         f"appear once (one image and one .cls): rewrite the shard without the duplicate.")


def _check_end(path: Path, end: int) -> None:
    """tarfile ends its walk quietly at a header cut short or damaged, or at the end of the file: a
    shard must end with the end-of-archive blocks (zeros) where its last member ends."""
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read(512)
    if not tail:
        raise ValueError(_truncated(path, f"its last member ends at byte {end} with no end-of-archive blocks after it"))
    if len(tail) < 512 and tail.strip(b"\0"):
        raise ValueError(_truncated(path, f"the member header at byte {end} is cut short"))
    if tail.strip(b"\0"):
        raise ValueError(f"tar shard {path} has a damaged member header at byte {end} (the samples after it would "
                         f"be lost); copy or download it again, or remove it.")


def _runs_to(member: tarfile.TarInfo) -> str:
    return f"member {member.name} runs to byte {member.offset_data + member.size}"


def _truncated(path: Path, where: str) -> str:
    return (f"tar shard {path} is truncated: {where} but the file ends at byte {os.path.getsize(path)}; "
            f"copy or download it again, or remove it.")


def list_shard_split(split_dir: Path, image_size: int, classes: tuple[str, ...] | None) -> TarSamples:
    """The samples of split_dir/*.tar; `classes` the training shards' (None: read from these)."""
    shards = sorted(p for p in split_dir.iterdir() if p.suffix == ".tar" and p.is_file())
    if not shards:
        raise FileNotFoundError(f"{split_dir} holds no .tar shards; tar-shards needs {split_dir}/000000.tar ...")
    parts = []
    for i, shard in enumerate(shards):
        parts.append(cached_index(shard, "tar", partial(_index_shard, shard), SHARD_INDEX_FIELDS, _shard_index_holds))
        if len(shards) > 20 and (i + 1) % 100 == 0:
            print(f"indexing {split_dir}: {i + 1} of {len(shards)} shards", file=sys.stderr, flush=True)
    # the shards' name blobs end to end; each shard's name offsets move by the bytes before it
    name_starts = np.cumsum([0] + [len(p["names"]) for p in parts])
    name_ends = [p["name_offsets"][1:] + start for p, start in zip(parts, name_starts)]
    names = np.concatenate([p["names"] for p in parts]), np.concatenate([np.zeros(1, np.int64), *name_ends])
    labels = np.concatenate([p["labels"] for p in parts])
    shard = np.concatenate([np.full(len(p["labels"]), i, np.int64) for i, p in enumerate(parts)])
    samples = TarSamples(shards, names, labels, (), image_size, shard,
                         np.concatenate([p["offsets"] for p in parts]), np.concatenate([p["sizes"] for p in parts]))
    if int(labels.min()) < 0:
        raise ValueError(f"{split_dir} has a sample with class {int(labels.min())}; classes are 0, 1, 2, ...")
    if classes is None:
        classes = tuple(str(k) for k in range(int(labels.max()) + 1))
    elif int(labels.max()) >= len(classes):
        where = samples.name(int(labels.argmax()))
        raise ValueError(f"{where} in {split_dir} has class {int(labels.max())}, which the training shards lack "
                         f"(they have classes 0..{len(classes) - 1}); every class needs training samples.")
    samples.classes = tuple(classes)
    return samples


def list_tar_shards(root: str | Path, image_size: int) -> tuple[TarSamples, TarSamples]:
    """(train, test) samples of root/train/*.tar and root/test/*.tar (or root/val/). Class names
    come from root/classes.txt (one a line) when present, else "0", "1", ..."""
    root = Path(root).expanduser()
    test_dir = test_split_dir(root, "tar shard")
    names_file = root / "classes.txt"
    train = list_shard_split(root / "train", image_size, None)
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(names) < train.num_classes:
            raise ValueError(f"{names_file} names {len(names)} classes but the training shards use "
                             f"{train.num_classes}; give one name a line for each.")
        train.classes = tuple(names)
    else:  # a gap in the labels would be a class the model learns never to predict, unnoticed
        empty = np.flatnonzero(np.bincount(train.labels, minlength=train.num_classes) == 0)
        if len(empty):
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            raise ValueError(f"the training shards in {root / 'train'} have labels up to {train.num_classes - 1} "
                             f"but no sample of {len(empty)} of those {train.num_classes} classes ({shown}); "
                             f"number the classes 0..K-1 without gaps, or list every class in {names_file} "
                             f"(one name a line) to train with empty classes.")
    return train, list_shard_split(test_dir, image_size, train.classes)

