"""Where a dataset lives: decoded whole on the device (small, one image size) or streamed from disk.

`data.storage`: `memory` decodes every image at load (today's path: exact channel statistics,
views made on the device, at the images' own size); `stream` lists the files and decodes them in
loader workers, batch by batch, at `views.size`; `auto` streams tar shards, RandomResizedCrop views
(`views.train: rrc`) and folders whose images differ in size or would take more than
MEMORY_LIMIT_BYTES decoded; every other image folder is held in memory, and one stderr line says
which and why. Sizes are known from every header up to HEADER_CHECK_LIMIT files; past it, from the
headers of SIZE_SAMPLE files drawn with data.split_seed, and every image's size is then checked as
it is decoded into memory: a folder that turns out mixed is streamed, said in a line.

A streamed dataset's mean and std are `data.mean` / `data.std` when given, else estimated on the
eval views of STATS_SAMPLE training images drawn with data.split_seed: a pass over every image
would cost an epoch of decoding, and a few hundred images pin the statistics to about 1%.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from .. import distributed
from .crops import ViewSpec
from .datasets import DatasetSplits, load_dataset, stratified_split
from .formats import MixedImageSizes
from .samples import Samples, list_image_folder, list_image_split, list_shard_split, list_tar_shards, own_val_dir
from .stream import estimate_channel_stats
from .views import AugmentSpec

__all__ = ["STREAMED_DATASETS", "check_headers", "is_streamed", "load_splits"]

STREAMED_DATASETS = ("image-folder", "tar-shards")
HEADER_CHECK_LIMIT = 20_000  # up to this many files, every header is read at load: bad files are named then
MEMORY_LIMIT_BYTES = 1 << 30  # auto: the most decoded bytes held in memory
SIZE_SAMPLE = 256  # auto, past HEADER_CHECK_LIMIT files: headers read to guess the folder's image sizes
STATS_SAMPLE = 512
STREAM_AUGMENT = AugmentSpec(crop_padding=4, flip=True)  # views.train=crop_flip's default on streamed data


def check_headers(samples: Samples) -> list[tuple[int, int]]:
    """Each image's (width, height) from its header; a file that is not an image is named in one sentence."""
    from PIL import Image

    sizes = []
    for i in range(len(samples)):
        try:
            source = samples.describe(i) if hasattr(samples, "root") else io.BytesIO(samples.read(i))
            with Image.open(source) as im:  # the header only: decoding waits for the loader workers
                sizes.append(im.size)
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot read image {samples.describe(i)} ({err}); remove or replace the file.") from None
    return sizes


def _stream(name: str, train: Samples, test: Samples, *, val: Samples | None, val_dir: Path | None, val_fraction: float,
            split_seed: int, mean, std, views: ViewSpec, workers: int, on_decode_error: str) -> DatasetSplits:
    val_source = None if val is None else f"{val_dir} ({len(val)} images)"
    if val is None and val_fraction > 0:
        keep, held = stratified_split(train.labels, float(val_fraction), split_seed)
        train, val = train.subset(keep), train.subset(held)
    if mean is None or std is None:
        estimated = estimate_channel_stats(train, views, count=STATS_SAMPLE, seed=split_seed, workers=workers,
                                           on_decode_error=on_decode_error)
        mean, std = mean or estimated[0], std or estimated[1]
    return _with_stats(DatasetSplits(name=name, train=train, val=val, test=test, mean=tuple(mean), std=tuple(std),
                                     augment=STREAM_AUGMENT, val_source=val_source), None, None)


def load_splits(name: str, root: str | Path | None, *, storage: str = "auto", views: ViewSpec | None = None,
                train_view: str | None = None, val_fraction: float = 0.1, split_seed: int = 0, mean=None, std=None,
                workers: int = 2, on_decode_error: str = "stop") -> DatasetSplits:
    """The dataset `name`, in memory or streamed (see the module docstring); `train_view` is
    data.views.train as configured (None: the storage's default)."""
    views = views or ViewSpec()
    if name not in STREAMED_DATASETS:
        if storage == "stream" or train_view == "rrc":
            what = "data.storage=stream" if storage == "stream" else "views.train=rrc"
            raise ValueError(f"{what} needs images read from files ({', '.join(STREAMED_DATASETS)}); dataset "
                             f"'{name}' is held in memory, so use views.train=crop_flip or none.")
        return _with_stats(load_dataset(name, root=root, val_fraction=val_fraction, split_seed=split_seed), mean, std)
    if root is None:
        raise ValueError(f"dataset '{name}' needs root (data.root): the folder with train/ and test/ (or val/).")
    if name == "tar-shards":
        if storage == "memory":
            raise ValueError("data.storage=memory reads image folders; tar shards are always streamed.")
        train, test = list_tar_shards(root, views.size)
    else:
        train, test = list_image_folder(root, views.size)
    val_dir = own_val_dir(Path(root).expanduser())
    val = None if val_dir is None else list_image_split(train.root, val_dir, train.classes, views.size) \
        if name == "image-folder" else list_shard_split(val_dir, views.size, train.classes)
    count = len(train) + len(test) + (len(val) if val is not None else 0)
    if storage == "memory" and train_view == "rrc":
        raise ValueError("views.train=rrc crops images as they are decoded: it needs data.storage stream or auto.")
    every = count <= HEADER_CHECK_LIMIT
    if every:  # names a file that is no image before any training
        sizes = check_headers(train) + check_headers(test) + (check_headers(val) if val is not None else [])
    guessed = False  # memory chosen from a sample of the headers
    if storage == "auto":
        storage, why = _auto_storage(name, train_view, count, lambda: sizes if every else
                                     _sampled_sizes(train, test, split_seed))
        guessed = storage == "memory" and not every
        _say(f"data.storage auto: {why}")
    if storage == "memory":
        try:
            return _with_stats(load_dataset(name, root=root, val_fraction=val_fraction, split_seed=split_seed),
                               mean, std)
        except MixedImageSizes as err:
            if not guessed:
                raise
            _say(f"data.storage auto: streamed after all, at views.size={views.size}: {err.found}")
    return _stream(name, train, test, val=val, val_dir=val_dir, val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   views=views, workers=workers, on_decode_error=on_decode_error)


def _auto_storage(name: str, train_view: str | None, count: int, read_sizes) -> tuple[str, str]:
    """('memory' or 'stream', why) for data.storage=auto; `read_sizes()` gives the header sizes of all
    `count` images or of a sample of them."""
    if name == "tar-shards":
        return "stream", "streamed: tar shards are always read from their files"
    if train_view == "rrc":
        return "stream", "streamed: views.train=rrc crops images as they are decoded"
    sizes = read_sizes()
    seen = sorted(set(sizes))
    if len(seen) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in seen[:3]) + (", ..." if len(seen) > 3 else "")
        return "stream", f"streamed at views.size: the images differ in size ({shown})"
    (w, h), decoded = seen[0], count * seen[0][0] * seen[0][1] * 3
    if decoded > MEMORY_LIMIT_BYTES:
        return "stream", (f"streamed at views.size: {count} images of {w}x{h} take {decoded / 2**30:.1f} GiB "
                          f"decoded, over the {MEMORY_LIMIT_BYTES / 2**30:g} GiB held in memory")
    known = (f"all {count} images are {w}x{h}" if len(sizes) == count else
             f"the headers of {len(sizes)} of the {count} images (drawn with data.split_seed) are all {w}x{h}; "
             f"every image's size is checked as it loads")
    return "memory", f"held in memory and trained at {w}x{h} ({decoded / 2**20:.0f} MiB decoded): {known}"


def _sampled_sizes(train: Samples, test: Samples, seed: int) -> list[tuple[int, int]]:
    """The header sizes of SIZE_SAMPLE images of train and test together, drawn with `seed`."""
    count = len(train) + len(test)
    picks = np.sort(np.random.default_rng(seed).choice(count, min(SIZE_SAMPLE, count), replace=False))
    return check_headers(train.subset(picks[picks < len(train)])) + \
        check_headers(test.subset(picks[picks >= len(train)] - len(train)))


def _say(line: str) -> None:
    if distributed.world().is_main:  # every rank decides alike: one line, not one per rank
        print(line, file=sys.stderr, flush=True)


def _with_stats(splits: DatasetSplits, mean, std) -> DatasetSplits:
    """Given statistics replace the computed ones (e.g. to match pretrained teachers)."""
    if mean is not None:
        splits.mean = tuple(float(m) for m in mean)
    if std is not None:
        splits.std = tuple(float(s) for s in std)
    for key, values in (("mean", splits.mean), ("std", splits.std)):
        if len(values) != splits.in_channels:
            raise ValueError(f"data.{key} has {len(values)} values but the images have {splits.in_channels} "
                             f"channels; give one per channel.")
    if any(s <= 0 for s in splits.std):
        raise ValueError(f"data.std must be positive in every channel, got {list(splits.std)}.")
    return splits


def is_streamed(splits) -> bool:
    return isinstance(getattr(splits, "train", None), Samples)
