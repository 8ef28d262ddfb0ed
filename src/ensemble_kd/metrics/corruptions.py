"""Common corruptions of image batches and the robustness metrics under them (CIFAR-10-C style).

Hendrycks & Dietterich (2019) measure robustness as accuracy and calibration on test
images passed through fixed corruptions at five severities. This module applies eight
of them on the fly to float batches (N, C, H, W) in [0, 1] (C = 1 or 3, any H, W down
to the 8x8 digits), so no corrupted copy of a data set has to be stored. Each
corruption is `name(x, severity, generator=None)` and returns a tensor of the same
shape, dtype and device, in [0, 1].

Severity constants (columns are severities 1..5):

    corruption      parameter                                1     2     3     4     5
    gaussian_noise  std of added N(0, s^2)                   0.04  0.06  0.08  0.09  0.10
    shot_noise      photons per unit: Poisson(x*l)/l         500   250   100   75    50
    impulse_noise   fraction of values set to 0 or 1         0.01  0.02  0.03  0.05  0.07
    defocus_blur    disk reach beyond the centre pixel at    0.05  0.15  0.30  0.70  1.15
                    32 px, scaled by min(H, W) / 32
    contrast        factor towards the per-channel mean      0.75  0.50  0.40  0.30  0.15
    brightness      added to the HSV value channel           0.05  0.10  0.15  0.20  0.30
    jpeg            Pillow JPEG quality                      80    65    58    50    40
    pixelate        side fraction kept by the down-sample    0.95  0.90  0.85  0.75  0.65

Noise, contrast, brightness, JPEG and pixelate constants are the CIFAR-10-C ones.
CIFAR-10-C's defocus blur (a disk of radius 0.3..1.5 px smoothed by a Gaussian) would
vanish below one pixel on 8x8 images, so ours is an anti-aliased disk whose weight
falls linearly from 1 at the centre pixel to 0 at distance 1 + reach; any reach > 0
blurs. The reaches are fitted so that at 32x32 the centre weights (0.83, 0.63, 0.45,
0.20, 0.12) are close to those of CIFAR-10-C's kernels (0.85, 0.62, 0.45, 0.20, 0.11).
Pixelate keeps round(f * side) but at most side - severity pixels (at least 1), so the
five levels stay distinct on 8x8 images (7, 6, 5, 4, 3 pixels). At that size the
non-integer ratios alias, so on real digits the mean change of pixelate grows with
severity only roughly (0.12, 0.15, 0.13, 0.14, 0.22 on sklearn's digits).

An int seed (in `corrupt`, `corruption_suite` or as `generator`) makes a CPU generator
and the draws are moved to the images' device, so a seed gives the same corruption on
every device; generator=None uses torch's global random state.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..progress import quiet_progress
from ._checks import check_logits_labels
from .calibration import expected_calibration_error
from .classification import negative_log_likelihood, top_k_accuracy

Seed = torch.Generator | int | None

GAUSSIAN_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_PHOTONS = (500.0, 250.0, 100.0, 75.0, 50.0)
IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)
DEFOCUS_REACH_32 = (0.05, 0.15, 0.30, 0.70, 1.15)
CONTRAST_FACTOR = (0.75, 0.50, 0.40, 0.30, 0.15)
BRIGHTNESS_SHIFT = (0.05, 0.10, 0.15, 0.20, 0.30)
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE_FRACTION = (0.95, 0.90, 0.85, 0.75, 0.65)


def _check_images(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}.")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"images must be a floating tensor in [0, 1], got {x.dtype}; divide uint8 images by 255.")
    if x.numel() == 0:
        raise ValueError(f"images are empty (shape {tuple(x.shape)}); pass at least one pixel.")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError("images must lie in [0, 1]; corrupt them before normalising (mean/std).")
    return x


def _check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= severity <= 5:
        raise ValueError(f"severity={severity!r} must be an integer from 1 to 5.")
    return int(severity)


def _generator(generator: Seed) -> torch.Generator | None:
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}.")


def _prepare(x, severity) -> tuple[torch.Tensor, int]:
    """Checked input in its working dtype (float64 stays, others compute in float32) and 0-based level."""
    x = _check_images(x)
    level = _check_severity(severity) - 1
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), level


def _finish(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return out.clamp_(0.0, 1.0).to(like.dtype)


def _rand(fn, w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fn(shape) drawn on the generator's device (the CPU for seeds), then moved to w's device."""
    device = generator.device if generator is not None else w.device
    return fn(w.shape, generator=generator, device=device, dtype=w.dtype).to(w.device)


def gaussian_noise(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """x + N(0, std^2) per value, clipped to [0, 1]."""
    w, level = _prepare(x, severity)
    return _finish(w + GAUSSIAN_STD[level] * _rand(torch.randn, w, _generator(generator)), x)


def shot_noise(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Poisson(x * photons) / photons: photon-counting noise, stronger in bright pixels."""
    w, level = _prepare(x, severity)
    gen = _generator(generator)
    rates = (w * SHOT_PHOTONS[level]).to(gen.device if gen is not None else w.device)
    return _finish(torch.poisson(rates, generator=gen).to(w.device) / SHOT_PHOTONS[level], x)


def impulse_noise(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Salt and pepper: each value becomes 0 or 1 (equally likely) with probability `amount`."""
    w, level = _prepare(x, severity)
    gen = _generator(generator)
    # Separate draws for "hit" and "salt or pepper": with one seed the hits of a lower
    # severity are a subset of those of a higher one, with the same values.
    hit = _rand(torch.rand, w, gen) < IMPULSE_AMOUNT[level]
    salt = (_rand(torch.rand, w, gen) < 0.5).to(w.dtype)
    return _finish(torch.where(hit, salt, w), x)


def _disk_kernel(reach: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Anti-aliased disk: weight clamp(1 + reach - distance, 0, 1), normalised to sum 1."""
    half = math.floor(1.0 + reach)
    ax = torch.arange(-half, half + 1, dtype=torch.float64)
    dist = torch.hypot(ax[:, None], ax[None, :])
    k = (1.0 + reach - dist).clamp(0.0, 1.0)
    return (k / k.sum()).to(dtype=dtype, device=device)


def defocus_blur(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Convolution with an anti-aliased disk whose reach scales with min(H, W) / 32 (deterministic)."""
    w, level = _prepare(x, severity)
    reach = DEFOCUS_REACH_32[level] * min(w.shape[2], w.shape[3]) / 32.0
    k = _disk_kernel(reach, w.dtype, w.device)
    half, channels = k.shape[0] // 2, w.shape[1]
    # Replicate padding works for any image size (reflect needs the pad below the side).
    padded = F.pad(w, (half, half, half, half), mode="replicate")
    return _finish(F.conv2d(padded, k.expand(channels, 1, *k.shape), groups=channels), x)


def contrast(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Pull every pixel towards its image's per-channel mean: (x - m) * factor + m (deterministic)."""
    w, level = _prepare(x, severity)
    mean = w.mean(dim=(2, 3), keepdim=True)
    return _finish((w - mean) * CONTRAST_FACTOR[level] + mean, x)


def brightness(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Add to the HSV value V = max over channels, keeping hue and saturation (deterministic).

    With H and S fixed every RGB channel is proportional to V, so the HSV round trip is a
    per-pixel scaling by V'/V; black pixels (V = 0, no hue) become grey V'. For C = 1
    this is min(x + shift, 1).
    """
    w, level = _prepare(x, severity)
    v = w.amax(dim=1, keepdim=True)
    v_new = (v + BRIGHTNESS_SHIFT[level]).clamp(max=1.0)
    return _finish(torch.where(v > 0, w * (v_new / v.clamp_min(1e-12)), v_new.expand_as(w)), x)


def jpeg(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Encode each image as a Pillow JPEG (grey 'L' for C = 1, 'RGB' for C = 3) and decode it back."""
    w, level = _prepare(x, severity)
    as_uint8 = (w * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for img in as_uint8:
        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)  # uint8 2-D -> "L", (H, W, 3) -> "RGB"
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY[level])
        arr = np.asarray(Image.open(buf).convert(pil.mode))
        decoded.append(arr.reshape(img.shape))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(device=w.device, dtype=w.dtype) / 255.0
    return _finish(out, x)


def _pixelate_side(side: int, level: int) -> int:
    # At most side - severity so that the five levels stay distinct even on 8x8 images.
    return max(1, min(round(PIXELATE_FRACTION[level] * side), side - (level + 1)))


def _area_weights(out: int, inp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out, inp) matrix: the fraction of each output cell [i, i+1) * inp/out covered by input pixel j."""
    edges = torch.arange(out + 1, dtype=torch.float64) * inp / out
    j = torch.arange(inp, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)).clamp_min(0.0)
    return (overlap / overlap.sum(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def pixelate(x: torch.Tensor, severity: int, generator: Seed = None) -> torch.Tensor:
    """Area down-sample to a fraction of the side, nearest up-sample back (deterministic)."""
    w, level = _prepare(x, severity)
    height, width = w.shape[2], w.shape[3]
    # Exact area weights (like Pillow's BOX filter): adaptive pooling rounds its windows to
    # whole pixels, which for 32 -> 30 shifts the grid and hides the severity.
    rows = _area_weights(_pixelate_side(height, level), height, w.dtype, w.device)
    cols = _area_weights(_pixelate_side(width, level), width, w.dtype, w.device)
    small = torch.einsum("ih,nchw,jw->ncij", rows, w, cols)
    return _finish(F.interpolate(small, size=(height, width), mode="nearest-exact"), x)


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}


def _lookup(name: str) -> Callable[..., torch.Tensor]:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}.")
    return CORRUPTIONS[name]


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..5) to a [0, 1] batch, reproducibly for a given seed."""
    return _lookup(name)(x, severity, torch.Generator().manual_seed(int(seed)))


_METRIC_KEYS = ("acc", "nll", "ece")


def _evaluate(predict_fn, images, labels, transform, batch_size: int, n_bins: int) -> dict[str, float]:
    """acc, nll and ece of softmax(predict_fn(transform(batch))) over all images."""
    chunks = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunks.append(torch.as_tensor(predict_fn(transform(images[start : start + batch_size]))).detach().cpu())
    logits, labels = check_logits_labels(torch.cat(chunks), labels, name="predict_fn output")
    probs = torch.softmax(logits.double(), dim=1)
    return {
        "acc": top_k_accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins=n_bins),
    }


def _mean(entries: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(e[key] for e in entries) / len(entries) for key in _METRIC_KEYS}


def corruption_suite(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels,
    names=None,
    severities=(1, 2, 3, 4, 5),
    batch_size: int = 500,
    seed: int = 0,
    n_bins: int = 15,
) -> dict:
    """Accuracy, NLL and ECE of a classifier on clean and corrupted copies of a test set.

    predict_fn(x) takes a [0, 1] batch (normalise inside it) and returns logits (B, K);
    it runs under torch.no_grad(). Images are corrupted batch by batch, so memory stays at
    one batch. Each (corruption, severity) starts a CPU generator from the same `seed`
    (common random numbers: e.g. impulse-noise hits of severity 2 include those of
    severity 1), and the results depend on seed and batch_size (which splits the random
    draws). Returns

        {"clean": {"acc", "nll", "ece"},
         "per": {"gaussian_noise/1": {"acc", "nll", "ece"}, ...},
         "by_corruption": {"gaussian_noise": mean over severities, ...},
         "mean": mean over every "per" entry}

    with float values; every corruption has the same severities, so "mean" is also the
    mean of the "by_corruption" entries.
    """
    images = _check_images(images)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), one per image, got {tuple(labels.shape)}.")
    names = list(CORRUPTIONS) if names is None else [names] if isinstance(names, str) else list(names)
    severities = list(dict.fromkeys(_check_severity(s) for s in severities))
    if not names or not severities:
        raise ValueError("names and severities must each hold at least one entry.")
    fns = {name: _lookup(name) for name in names}
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")

    def run(transform):
        return _evaluate(predict_fn, images, labels, transform, int(batch_size), n_bins)

    per: dict[str, dict[str, float]] = {}
    by_corruption: dict[str, dict[str, float]] = {}
    progress = quiet_progress()  # 40 passes over the sample: a line every 30 s when they take that long
    task = progress.add_task("corruptions", total=len(fns) * len(severities), images_per_step=len(images))
    for name, fn in fns.items():
        for sev in severities:
            gen = torch.Generator().manual_seed(int(seed))
            per[f"{name}/{sev}"] = run(lambda xb, fn=fn, sev=sev, gen=gen: fn(xb, sev, gen))
            progress.update(task, advance=1)
        by_corruption[name] = _mean([per[f"{name}/{sev}"] for sev in severities])
    return {"clean": run(lambda xb: xb), "per": per, "by_corruption": by_corruption, "mean": _mean(list(per.values()))}
