"""Seeded views of images of any size: RandomResizedCrop + flip for training, resize + center crop for eval.

The crop box is torchvision's RandomResizedCrop algorithm (10 attempts at a random area and
log-uniform aspect ratio, then a center-crop fallback), with every draw taken from
hash_ints(seed, epoch, index, ...) instead of a generator: a sample's view is a pure function
of (seed, epoch, index), whatever worker, rank or batch makes it. The boxes are plain Python
ints computed where the image is decoded (a loader worker), and applied with Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .views import _STREAM_FLIP, hash_ints

__all__ = ["ViewSpec", "center_crop_box", "rrc_box", "view_of_image", "view_flip"]

TRAIN_VIEWS = ("rrc", "crop_flip", "none")
_STREAM_AREA, _STREAM_RATIO, _STREAM_TOP, _STREAM_LEFT = 0x4A1, 0x5B2, 0x6C3, 0x7D4
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a center crop


@dataclass(frozen=True)
class ViewSpec:
    """How decoded images become size x size views.

    train: `rrc` (RandomResizedCrop(size, scale, ratio), then a flip when `flip`), `crop_flip` (the
    eval view, then the padded crop and flip of data.augment, on the device), `none` (the eval view).
    Eval: the shorter side resized to floor(size / crop_fraction), then the center size x size.
    """

    train: str = "rrc"
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.train not in TRAIN_VIEWS:
            raise ValueError(f"views.train must be one of {', '.join(TRAIN_VIEWS)}, got {self.train!r}.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"views.size must be a positive integer, got {self.size!r}.")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"views.scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale!r}.")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"views.ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio!r}.")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"views.crop_fraction must be in (0, 1], got {self.crop_fraction!r}.")

    @property
    def eval_resize(self) -> int:
        """The shorter side of an image before the eval center crop."""
        return max(self.size, int(math.floor(self.size / self.crop_fraction)))


def _uniform(h: int, stream: int, attempt: int) -> float:
    """A draw in [0, 1) from the sample's hash."""
    return hash_ints(h, stream, attempt) / 4294967296.0


def rrc_box(width: int, height: int, *, seed: int, epoch: int, index: int, scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of RandomResizedCrop's box for sample `index` of a width x height image."""
    h0 = hash_ints(seed, epoch, index)
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * _uniform(h0, _STREAM_AREA, attempt))
        aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(h0, _STREAM_RATIO, attempt))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = hash_ints(h0, _STREAM_TOP, attempt) % (height - h + 1)
            left = hash_ints(h0, _STREAM_LEFT, attempt) % (width - w + 1)
            return left, top, w, h
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centered.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def view_flip(*, seed: int, epoch: int, index: int) -> bool:
    """The flip of sample `index`: the same draw as the in-memory views' (views.view_params)."""
    return bool(hash_ints(hash_ints(seed, epoch, index), _STREAM_FLIP) & 1)


def center_crop_box(width: int, height: int, resize: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """((W', H'), (left, top, right, bottom)): the image resized so its shorter side is `resize`
    (the longer side scaled and truncated, as torchvision's Resize(int)), then its center size x size."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return (new_w, new_h), (left, top, left + size, top + size)


def view_of_image(image, spec: ViewSpec, *, train: bool, seed: int, epoch: int | None, index: int) -> np.ndarray:
    """The (size, size, 3) uint8 view of an RGB PIL image: its training view at (seed, epoch, index) for
    train views `rrc`, else the eval view (the device adds crop_flip's pixels afterwards)."""
    from PIL import Image

    size = spec.size
    if train and spec.train == "rrc":
        left, top, w, h = rrc_box(image.width, image.height, seed=seed, epoch=epoch, index=index,
                                  scale=spec.scale, ratio=spec.ratio)
        # crop, then resize: torchvision's resized_crop on the same box gives these very pixels
        out = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        if spec.flip and view_flip(seed=seed, epoch=epoch, index=index):
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        new_size, box = center_crop_box(image.width, image.height, spec.eval_resize, size)
        out = image.resize(new_size, Image.BILINEAR).crop(box)
    return np.asarray(out, dtype=np.uint8)
