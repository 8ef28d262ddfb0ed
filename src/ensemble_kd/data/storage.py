"""Where a dataset lives: decoded whole on the device (small, one image size) or streamed from disk.

`data.storage`: `memory` decodes every image at load (today's path: exact channel statistics,
views made on the device); `stream` lists the files and decodes them in loader workers, batch by
batch; `auto` streams tar shards, RandomResizedCrop views (`views.train: rrc`), folders of more
than HEADER_CHECK_LIMIT files, and folders whose images differ in size or would take more than
MEMORY_LIMIT_BYTES decoded; every other image folder is held in memory.

A streamed dataset's mean and std are `data.mean` / `data.std` when given, else estimated on the
eval views of STATS_SAMPLE training images drawn with data.split_seed: a pass over every image
would cost an epoch of decoding, and a few hundred images pin the statistics to about 1%.
"""

from __future__ import annotations

import io
from pathlib import Path

from .crops import ViewSpec
from .datasets import DatasetSplits, load_dataset, stratified_split
from .samples import Samples, list_image_folder, list_tar_shards
from .stream import estimate_channel_stats
from .views import AugmentSpec

__all__ = ["STREAMED_DATASETS", "check_headers", "is_streamed", "load_splits"]

STREAMED_DATASETS = ("image-folder", "tar-shards")
HEADER_CHECK_LIMIT = 20_000  # up to this many files, every header is read at load: bad files are named then
MEMORY_LIMIT_BYTES = 1 << 30  # auto: the most decoded bytes held in memory
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


def _stream(name: str, train: Samples, test: Samples, *, val_fraction: float, split_seed: int, mean, std,
            views: ViewSpec, workers: int, on_decode_error: str) -> DatasetSplits:
    val = None
    if val_fraction > 0:
        keep, held = stratified_split(train.labels, float(val_fraction), split_seed)
        train, val = train.subset(keep), train.subset(held)
    if mean is None or std is None:
        estimated = estimate_channel_stats(train, views, count=STATS_SAMPLE, seed=split_seed, workers=workers,
                                           on_decode_error=on_decode_error)
        mean, std = mean or estimated[0], std or estimated[1]
    return _with_stats(DatasetSplits(name=name, train=train, val=val, test=test, mean=tuple(mean), std=tuple(std),
                                     augment=STREAM_AUGMENT), None, None)


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
    count = len(train) + len(test)
    if storage == "memory" and train_view == "rrc":
        raise ValueError("views.train=rrc crops images as they are decoded: it needs data.storage stream or auto.")
    if count <= HEADER_CHECK_LIMIT:  # names a file that is no image before any training
        sizes = check_headers(train) + check_headers(test)
    if storage == "auto" and name == "image-folder" and train_view != "rrc" and count <= HEADER_CHECK_LIMIT:
        same = len(set(sizes)) == 1
        w, h = sizes[0]
        storage = "memory" if same and count * w * h * 3 <= MEMORY_LIMIT_BYTES else "stream"
    if storage == "memory":
        return _with_stats(load_dataset(name, root=root, val_fraction=val_fraction, split_seed=split_seed), mean, std)
    return _stream(name, train, test, val_fraction=val_fraction, split_seed=split_seed, mean=mean, std=std,
                   views=views, workers=workers, on_decode_error=on_decode_error)


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
