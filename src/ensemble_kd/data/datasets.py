"""Datasets as uint8 tensors, a registry of loaders, the seeded stratified splits and channel statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .formats import load_cifar, load_idx_pair, load_image_folder
from .views import AugmentSpec

__all__ = [
    "ImageDataset",
    "DatasetSplits",
    "load_dataset",
    "list_datasets",
    "register_dataset",
    "stratified_split",
    "channel_stats",
    "FASHION_MNIST_ROOT",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED = 0.25, 0


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} of shape {tuple(x.shape)}"
    return type(x).__name__


@dataclass
class ImageDataset:
    """Images uint8 (N,C,H,W), labels int64 (N,) in 0..len(classes)-1, class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            got = _describe(self.images)
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {got}.")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            got = _describe(self.labels)
            raise ValueError(f"labels must be an int64 tensor (N,), got {got}.")
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"there are {len(self.images)} images but {len(self.labels)} labels; "
                f"give one label per image."
            )
        if not self.classes:
            raise ValueError("classes is empty; give one name per class.")
        if len(self.labels):
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(self.classes):
                raise ValueError(
                    f"labels range over {lo}..{hi} but there are {len(self.classes)} classes; "
                    f"labels must be 0..{len(self.classes) - 1}."
                )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The samples at `indices`, in that order."""
        if not isinstance(indices, torch.Tensor):
            indices = np.asarray(indices, dtype=np.int64)
        idx = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images.index_select(0, idx.to(self.images.device))
        return ImageDataset(images, self.labels.index_select(0, idx.to(self.labels.device)), self.classes)


@dataclass
class DatasetSplits:
    """Train / validation (or None) / test sets, train channel statistics on the 0..1 scale, default augmentation."""

    name: str
    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec
    val_source: str | None = None  # the dataset's own validation split, when val is not carved from train

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.image_size


# ----------------------------------------------------------------------------- splits and statistics


def stratified_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (keep, held) index arrays: about `fraction` of every class held out, drawn with `seed`.

    Every class with two or more samples gets at least one sample on each side; beyond that, held
    counts are fraction * class size rounded (largest remainders) so the total is round(fraction * N).
    """
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}.")
    classes, counts = np.unique(y, return_counts=True)
    quota = fraction * counts
    held = np.floor(quota).astype(np.int64)
    if fraction > 0:  # every class with two or more samples appears on both sides
        held = np.where(counts >= 2, np.clip(held, 1, counts - 1), 0)
    # Then largest remainders first, so the total is round(fraction * N) whenever the minimums allow.
    rest = int(round(fraction * len(y))) - int(held.sum())
    room = held < counts - 1
    order = [k for k in np.argsort(-(quota - held), kind="stable") if room[k]]
    for k in order[: max(rest, 0)]:
        held[k] += 1
    rng = np.random.default_rng(seed)
    held_idx = [rng.permutation(np.flatnonzero(y == c))[:h] for c, h in zip(classes, held)]
    held_idx = np.sort(np.concatenate(held_idx)) if held_idx else np.zeros(0, np.int64)
    keep = np.ones(len(y), dtype=bool)
    keep[held_idx] = False
    return np.flatnonzero(keep), held_idx.astype(np.int64)


def channel_stats(images_u8: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images on the 0..1 scale."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images_u8.shape[1]):
        # A 256-bin histogram gives exact sums without a float copy of the whole dataset.
        hist = torch.bincount(images_u8[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        var = (hist * (values - m) ** 2).sum() / n
        means.append(float(m / 255.0))
        # A constant channel would divide by zero; std 1 leaves it merely shifted.
        stds.append(float(var.sqrt() / 255.0) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------- registry

Loader = Callable[[Path | None], tuple[ImageDataset, ImageDataset]]
_REGISTRY: dict[str, tuple[Loader, AugmentSpec]] = {}


def register_dataset(name: str, augment: AugmentSpec = AugmentSpec()) -> Callable[[Loader], Loader]:
    """Register `fn(root) -> (train, test)` under `name` with its default augmentation."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[name] = (fn, augment)
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by load_dataset."""
    return sorted(_REGISTRY)


def _to_dataset(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ImageDataset:
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    return ImageDataset(images_t, torch.from_numpy(labels.astype(np.int64)), tuple(classes))


def _require_root(root: Path | None, name: str, expected: str) -> Path:
    if root is None:
        raise ValueError(f"dataset '{name}' needs root (data.root): the folder with {expected}.")
    return root


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as load_digits gives them ((N, 8, 8) floats 0-16, (N,) int64 labels), read
    from the CSV it ships without importing scikit-learn (which costs more than the whole read)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset 'digits' is read from scikit-learn's files: pip install scikit-learn.")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@register_dataset("digits", AugmentSpec(crop_padding=1, flip=False))
def _digits(root: Path | None) -> tuple[ImageDataset, ImageDataset]:
    pixels, labels = digits_arrays()
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[:, None]
    classes = tuple(str(i) for i in range(10))
    # The test split is fixed (not split_seed) so every run scores on the same images.
    train, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return _to_dataset(images[train], labels[train], classes), _to_dataset(images[test], labels[test], classes)


@register_dataset("fashion-mnist", AugmentSpec(crop_padding=2, flip=True))
def _fashion_mnist(root: Path | None) -> tuple[ImageDataset, ImageDataset]:
    root = Path(FASHION_MNIST_ROOT) if root is None else root
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} not found: install it with `apt-get install dataset-fashion-mnist` "
            f"or set root (data.root) to a folder with train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
            f"t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)."
        )
    hint = " (install them with `apt-get install dataset-fashion-mnist` or set root (data.root) to their folder)"
    k = len(FASHION_MNIST_CLASSES)
    train = load_idx_pair(root, "train", k, hint)
    test = load_idx_pair(root, "t10k", k, hint)
    if train[0].shape[2:] != test[0].shape[2:]:
        raise ValueError(
            f"the train images in {root} are {train[0].shape[2:]} but the test images are {test[0].shape[2:]}; "
            f"they must match."
        )
    return _to_dataset(*train, FASHION_MNIST_CLASSES), _to_dataset(*test, FASHION_MNIST_CLASSES)


def _cifar_loader(name: str, folder: str) -> Loader:
    def load(root: Path | None) -> tuple[ImageDataset, ImageDataset]:
        root = _require_root(root, name, f"{folder} (or that folder itself)")
        train, test, classes = load_cifar(root, name)
        return _to_dataset(*train, classes), _to_dataset(*test, classes)

    return load


register_dataset("cifar10", AugmentSpec(crop_padding=4, flip=True))(_cifar_loader("cifar10", "cifar-10-batches-py"))
register_dataset("cifar100", AugmentSpec(crop_padding=4, flip=True))(_cifar_loader("cifar100", "cifar-100-python"))


@register_dataset("image-folder", AugmentSpec(crop_padding=4, flip=True))
def _image_folder(root: Path | None) -> tuple[ImageDataset, ImageDataset]:
    root = _require_root(root, "image-folder", "train/<class>/<images> and test/<class>/<images>")
    train, test, classes, val = load_image_folder(root)
    own_val = () if val is None else (_to_dataset(*val, classes),)
    return _to_dataset(*train, classes), _to_dataset(*test, classes), *own_val


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    augment: AugmentSpec | Mapping | None = None,
) -> DatasetSplits:
    """Load `name`, carve a seeded stratified validation split from train, and compute train statistics."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset '{name}'; available: {', '.join(list_datasets())}.")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    fn, default_augment = _REGISTRY[name]
    if augment is None:
        augment = default_augment
    elif isinstance(augment, Mapping):
        unknown = set(augment) - {"crop_padding", "flip"}
        if unknown:
            raise ValueError(f"unknown augment keys {sorted(unknown)}; use crop_padding and flip.")
        augment = AugmentSpec(**augment)
    elif not isinstance(augment, AugmentSpec):
        raise ValueError(f"augment must be an AugmentSpec or a mapping, got {type(augment).__name__}.")
    train, test, *own_val = fn(None if root is None else Path(root).expanduser())  # a loader may give its val
    if train.classes != test.classes:
        raise ValueError(
            f"dataset '{name}' has train classes {train.classes} but test classes {test.classes}; "
            f"they must match."
        )
    val, val_source = None, None
    if own_val:
        val, val_source = own_val[0], f"{Path(root).expanduser() / 'val'} ({len(own_val[0])} images)"
    elif val_fraction > 0:
        keep, held = stratified_split(train.labels, float(val_fraction), split_seed)
        train, val = train.subset(keep), train.subset(held)
    mean, std = channel_stats(train.images)
    return DatasetSplits(name=name, train=train, val=val, test=test, mean=mean, std=std, augment=augment,
                         val_source=val_source)
