"""Seeded views of images of any size: RandomResizedCrop + flip for training, resize + center crop for eval.

The crop box is torchvision's RandomResizedCrop algorithm (10 attempts at a random area and
log-uniform aspect ratio, then a center-crop fallback), with every draw taken from
hash_ints(seed, epoch, index, ...) instead of a generator: a sample's view is a pure function
of (seed, epoch, index), whatever worker, rank or batch makes it (for a given decoder, decode.py).
The boxes are plain Python ints computed where the image is decoded (a loader worker); the region
is resized by torch's antialiased bilinear on (H, W, 3) uint8 (torchvision's tensor resized_crop
on the same box gives these very pixels; Pillow's resize differs by at most 1 in a few pixels),
and views stay (H, W, 3) so that a batch is channels_last without a transpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decode import check_decoder
from .views import _STREAM_FLIP, hash_ints

__all__ = ["ViewPlan", "ViewSpec", "center_crop_box", "rrc_box", "view_flip", "view_of_pixels", "view_plan"]

TRAIN_VIEWS = ("rrc", "crop_flip", "none")
_STREAM_AREA, _STREAM_RATIO, _STREAM_TOP, _STREAM_LEFT = 0x4A1, 0x5B2, 0x6C3, 0x7D4
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back to a center crop
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's scaled IDCT offers below 1


@dataclass(frozen=True)
class ViewSpec:
    """How decoded images become size x size views.

    train: `rrc` (RandomResizedCrop(size, scale, ratio), then a flip when `flip`), `crop_flip` (the
    eval view, then the padded crop and flip of data.augment, on the device), `none` (the eval view).
    Eval: the shorter side resized to floor(size / crop_fraction), then the center size x size.
    decoder, draft: what decodes the images (data/decode.py), and whether JPEGs may be decoded at
    reduced scale where the view keeps its pixels (`ViewPlan.draft_scale`).
    """

    train: str = "rrc"
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_fraction: float = 0.875
    decoder: str = "pil"
    draft: bool = False

    def __post_init__(self) -> None:
        check_decoder(self.decoder, self.draft)
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


@dataclass(frozen=True)
class ViewPlan:
    """How a view is cut from a full-size image: the region (left, top, width, height) resized to
    `resize` (width, height), then `crop` (left, top, right, bottom) of that, or None, then a mirror."""

    box: tuple[int, int, int, int]
    resize: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    flip: bool

    def draft_scale(self) -> int:
        """The largest JPEG draft reduction after which the region still has the pixels it is resized
        to (no upsampling where the full decode had none), else 1."""
        _, _, w, h = self.box
        return next((s for s in DRAFT_SCALES if w // s >= self.resize[0] and h // s >= self.resize[1]), 1)


def view_plan(spec: ViewSpec, width: int, height: int, *, train: bool, seed: int, epoch: int | None,
              index: int) -> ViewPlan:
    """The plan of sample `index`'s view of a width x height image: its training view at (seed, epoch,
    index) for train views `rrc`, else the eval view (the device adds crop_flip's pixels afterwards)."""
    size = spec.size
    if train and spec.train == "rrc":
        box = rrc_box(width, height, seed=seed, epoch=epoch, index=index, scale=spec.scale, ratio=spec.ratio)
        return ViewPlan(box, (size, size), None, spec.flip and view_flip(seed=seed, epoch=epoch, index=index))
    new_size, crop = center_crop_box(width, height, spec.eval_resize, size)
    return ViewPlan((0, 0, width, height), new_size, crop, False)


def _scaled(v: int, factor: float) -> int:
    return int(math.floor(v * factor + 0.5))


def view_of_pixels(pixels: torch.Tensor, plan: ViewPlan, full_size: tuple[int, int]) -> torch.Tensor:
    """The (size, size, 3) uint8 view of (H, W, 3) uint8 pixels by `plan`, made for the image's full
    (width, height): pixels decoded at reduced scale (JPEG draft) take the plan's box scaled to them."""
    h_px, w_px = pixels.shape[:2]
    left, top, w, h = plan.box
    fx, fy = w_px / full_size[0], h_px / full_size[1]
    x0, y0 = _scaled(left, fx), _scaled(top, fy)
    x1, y1 = max(x0 + 1, min(w_px, _scaled(left + w, fx))), max(y0 + 1, min(h_px, _scaled(top + h, fy)))
    region = pixels[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w) with channels_last strides
    region = region.contiguous(memory_format=torch.channels_last)  # torch's fast uint8 kernel reads this layout
    out = F.interpolate(region, size=plan.resize[::-1], mode="bilinear", antialias=True, align_corners=False)
    out = out[0].permute(1, 2, 0)  # (H, W, 3) view of channels_last memory
    if plan.crop is not None:
        l, t, r, b = plan.crop
        out = out[t:b, l:r]
    return out.flip(1) if plan.flip else out
