"""Frame-level video data (a stand-in for YouTube-8M): a dataset type, a generator, .npz files, a loader.

Items are sequences of frame feature vectors, zero-padded to a common length T, with multi-hot
labels. The generator makes a learnable problem in which the evidence for a label is spread
over some of an item's frames, so how a model pools frames matters. The .npz format holds
arrays `features` (N, T, D) float, `num_frames` (N,) int and `labels` (N, C) multi-hot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .frames import SampledFrames, check_frames_per_video
from .loader import Batch, ShardedLoader
from .youtube8m import YouTube8M, YouTube8MLoader, list_splits

YOUTUBE8M_CLASSES = 3862  # the 2018 vocabulary

__all__ = ["VideoDataset", "VideoLoader", "load_video_npz", "make_video_dataset", "save_video_npz", "video_loader"]

NPZ_KEYS = ("features", "num_frames", "labels")


@dataclass
class VideoDataset:
    """Frame features float32 (N, T, D), zero after each item's num_frames int64 (N,); labels float32 (N, C) 0/1."""

    features: torch.Tensor
    num_frames: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        for name, dtype, dims, shape in (("features", torch.float32, 3, "(N, T, D)"),
                                         ("num_frames", torch.int64, 1, "(N,)"),
                                         ("labels", torch.float32, 2, "(N, C)")):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.dim() != dims:
                got = (f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"{name} must be a {dtype} tensor {shape}, got {got}.")
        n, t = self.features.shape[:2]
        if len(self.num_frames) != n or len(self.labels) != n:
            raise ValueError(f"features, num_frames and labels must have one row per item, got "
                             f"{n}, {len(self.num_frames)} and {len(self.labels)} rows.")
        if n and (int(self.num_frames.min()) < 1 or int(self.num_frames.max()) > t):
            raise ValueError(f"num_frames must be in 1..{t} (the padded length), got "
                             f"{int(self.num_frames.min())}..{int(self.num_frames.max())}.")
        if not bool(torch.isfinite(self.features).all()):
            raise ValueError("features contains NaN or inf.")
        padded = torch.arange(t, device=self.num_frames.device) >= self.num_frames[:, None]
        if bool(self.features[padded.to(self.features.device)].any()):
            raise ValueError("features must be zero after each item's num_frames; models find padding by its zeros.")
        if not bool(((self.labels == 0) | (self.labels == 1)).all()):
            raise ValueError("labels must be multi-hot: every entry 0 or 1.")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> VideoDataset:
        """The items at `indices`, in that order (e.g. to split one generated problem into train and test)."""
        if not isinstance(indices, torch.Tensor):
            indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        idx = indices.to(device=self.features.device, dtype=torch.int64)
        return VideoDataset(self.features[idx], self.num_frames[idx], self.labels[idx])


def make_video_dataset(n: int, num_classes: int = 20, feature_dim: int = 32, max_frames: int = 30,
                       min_frames: int = 5, labels_per_item: tuple[int, int] = (1, 3), seed: int = 0,
                       signal: float = 1.0) -> VideoDataset:
    """A synthetic multi-label video problem, deterministic given `seed`.

    Each class has a random unit prototype. An item draws labels_per_item[0]..[1] distinct
    labels and min_frames..max_frames frames; every frame is standard Gaussian noise, and with
    probability 0.5 it also carries `signal` x the prototype of one of the item's labels.
    Split one call's items for train and test: another seed draws other prototypes.
    """
    lo, hi = labels_per_item
    if n < 1:
        raise ValueError(f"n must be a positive number of items, got {n}.")
    if not 1 <= lo <= hi <= num_classes:
        raise ValueError(f"labels_per_item must be (lo, hi) with 1 <= lo <= hi <= num_classes={num_classes}, "
                         f"got {labels_per_item!r}.")
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"frame counts need 1 <= min_frames <= max_frames, got {min_frames} and {max_frames}.")
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((num_classes, feature_dim))
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    # An item's labels are the first k classes of a random permutation of all classes.
    perm = rng.random((n, num_classes)).argsort(1)
    k = rng.integers(lo, hi + 1, size=n)
    labels = np.zeros((n, num_classes), dtype=np.float32)
    np.put_along_axis(labels, perm, (np.arange(num_classes) < k[:, None]).astype(np.float32), axis=1)
    num_frames = rng.integers(min_frames, max_frames + 1, size=n)
    features = rng.standard_normal((n, max_frames, feature_dim))
    carries = rng.random((n, max_frames)) < 0.5
    which = np.take_along_axis(perm, (rng.random((n, max_frames)) * k[:, None]).astype(np.int64), axis=1)
    features += signal * carries[..., None] * prototypes[which]
    features[np.arange(max_frames) >= num_frames[:, None]] = 0.0
    return VideoDataset(torch.from_numpy(features.astype(np.float32)), torch.from_numpy(num_frames.astype(np.int64)),
                        torch.from_numpy(labels))


def save_video_npz(dataset: VideoDataset, path: str | os.PathLike) -> None:
    """Write `dataset` to `path` (exactly that name) as a compressed .npz that load_video_npz reads."""
    with open(path, "wb") as f:  # a file object stops numpy from appending ".npz" to the name
        np.savez_compressed(f, **{key: getattr(dataset, key).cpu().numpy() for key in NPZ_KEYS})


def load_video_npz(path: str | os.PathLike) -> VideoDataset:
    """Read a .npz with `features` (N, T, D) float, `num_frames` (N,) int, `labels` (N, C) multi-hot."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video dataset file at {os.fspath(path)!r}.")
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in NPZ_KEYS if key not in data]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} lacks the array(s) {', '.join(missing)}; a video .npz needs "
                             f"{', '.join(NPZ_KEYS)}.")
        features, num_frames, labels = (data[key] for key in NPZ_KEYS)
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features must be floating point, got {features.dtype}.")
    if not np.issubdtype(num_frames.dtype, np.integer):
        raise ValueError(f"num_frames must be integers, got {num_frames.dtype}.")
    return VideoDataset(torch.from_numpy(features.astype(np.float32)), torch.from_numpy(num_frames.astype(np.int64)),
                        torch.from_numpy(labels.astype(np.float32)))


class VideoLoader(SampledFrames, ShardedLoader):
    """Batches of a VideoDataset held on `device`, with DeviceLoader's order and interface.

    A batch holds x float32 (B, T_b, D), trimmed to its longest item T_b, y float32 (B, C) and
    the indices. With `frames_per_video` a training batch holds that many frames of each video
    instead, drawn for (seed, view_epoch, index) (data/frames.py); evaluation takes every frame.
    """

    def __init__(self, dataset: VideoDataset, *, batch_size: int, train: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool | None = None, rank: int = 0,
                 world_size: int = 1, frames_per_video: int | None = None) -> None:
        super().__init__(len(dataset), batch_size=batch_size, train=train, seed=seed, device=device,
                         drop_last=drop_last, rank=rank, world_size=world_size)
        self.frames_per_video = check_frames_per_video(frames_per_video)
        self.features = dataset.features.to(self.device)
        self.num_frames = dataset.num_frames.to(self.device)
        self.labels = dataset.labels.to(self.device)

    def batches(self, epoch: int | None, start: int = 0, view_epoch: int | None = None) -> Iterator[Batch]:
        """Yield the epoch's batches, skipping the first `start` (to resume mid-epoch)."""
        return self.batches_at(self.batch_indices(epoch, start), epoch if view_epoch is None else view_epoch)

    def batches_at(self, index_batches, view_epoch: int | None = None) -> Iterator[Batch]:
        """The batches of the given dataset indices (what the teacher cache computes)."""
        for idx in index_batches:
            idx = idx.to(self.device)
            num_frames = self.num_frames.index_select(0, idx)
            x = self.features.index_select(0, idx)[:, :int(num_frames.max())]
            yield Batch(self.frames(x, num_frames, idx, view_epoch), self.labels.index_select(0, idx), idx)



def video_loader(dataset, *, workers: int = 0, **kw) -> VideoLoader | YouTube8MLoader:
    """The loader of a video set: held in memory (VideoLoader) or streamed from TFRecords (`workers` readers)."""
    if isinstance(dataset, YouTube8M):
        return YouTube8MLoader(dataset, workers=workers, **kw)
    return VideoLoader(dataset, **kw)


# ----------------------------------------------------------------------------- splits for a run
VIDEO_DATASETS = ("video-synthetic", "video-npz", "youtube8m")


@dataclass
class VideoSplits:
    """Train / validation (or None) / test video sets: the `data.name` video-* counterpart of DatasetSplits."""

    name: str
    train: VideoDataset | YouTube8M
    val: VideoDataset | YouTube8M | None
    test: VideoDataset | YouTube8M

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:  # what a video model's builder takes as its input width
        return self.train.feature_dim


def load_video_splits(name: str, root: str | os.PathLike | None = None, val_fraction: float = 0.1,
                      split_seed: int = 0, num_classes: int | None = None, max_frames: int = 300) -> VideoSplits:
    """video-synthetic: 6000 generated items (seed 0) split 4/1 into train and test; video-npz:
    `root`/train.npz and `root`/test.npz (and val.npz, else `val_fraction` of train, by `split_seed`);
    youtube8m: `root`/train*.tfrecord and validate*.tfrecord (see youtube8m.list_splits), streamed,
    `num_classes` (default 3862) labels, the first `max_frames` frames, val as for video-npz."""
    if name == "video-synthetic":
        every = make_video_dataset(6000, num_classes=20, feature_dim=32, signal=2.0, seed=0)
        order = np.random.default_rng(0).permutation(len(every))
        train, test, val = every.subset(order[:4800]), every.subset(order[4800:]), None
    elif name == "video-npz":
        if root is None:
            raise ValueError("data.name video-npz reads root/train.npz and root/test.npz; set data.root")
        root = os.fspath(root)
        train, test = (load_video_npz(os.path.join(root, f"{s}.npz")) for s in ("train", "test"))
        val_path = os.path.join(root, "val.npz")
        val = load_video_npz(val_path) if os.path.isfile(val_path) else None
        if train.num_classes != test.num_classes or train.feature_dim != test.feature_dim:
            raise ValueError(f"train.npz has {train.num_classes} classes and {train.feature_dim} features but "
                             f"test.npz has {test.num_classes} and {test.feature_dim}; they must match")
    elif name == "youtube8m":
        if root is None:
            raise ValueError("data.name youtube8m reads root/train*.tfrecord and root/validate*.tfrecord; set data.root")
        files = list_splits(root)
        kw = dict(num_classes=num_classes or YOUTUBE8M_CLASSES, max_frames=max_frames)
        train, test, val = YouTube8M(files["train"], **kw), YouTube8M(files["test"], **kw), None
    else:
        raise ValueError(f"unknown video dataset {name!r}; available: {', '.join(VIDEO_DATASETS)}")
    if val is None and val_fraction > 0:
        order = np.random.default_rng(split_seed).permutation(len(train))
        held = int(round(val_fraction * len(train)))
        train, val = train.subset(np.sort(order[held:])), train.subset(np.sort(order[:held]))
    return VideoSplits(name, train, val, test)
