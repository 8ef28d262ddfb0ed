"""Robustness rows: accuracy, NLL and ECE under common corruptions, and OOD detection AUROC.

Both run on the first `eval.corruption_samples` test images: those held in memory, or the eval
views (resize, center crop) of a streamed split, read once. Corruptions act in pixel space
([0, 1]) and the result is normalised as the model's inputs are. The OOD set is the test split
of a second dataset (`eval.ood`): an image folder or tar shards (eval.ood_root) through the same
eval views as the test split, or a held dataset resized to the in-distribution images' size and
channel count; the scores are the maximum probability and the negative entropy (higher: in
distribution).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import load_dataset
from ..data.crops import ViewSpec
from ..data.samples import list_image_folder, list_tar_shards
from ..data.storage import STREAMED_DATASETS
from ..data.stream import StreamLoader
from ..data.views import standardize
from ..metrics.corruptions import corruption_suite
from ..metrics.ood import ood_metrics


def robustness_fields(log_probs: Callable[[torch.Tensor], torch.Tensor], test_loader, eval_cfg) -> dict:
    """`log_probs(x)` maps normalised inputs to (B, K) log-probabilities (logits do too)."""
    if not eval_cfg.corruptions and not eval_cfg.ood:
        return {}
    images, labels = test_images(test_loader, eval_cfg.corruption_samples)
    n = len(images)
    x01 = images.float() / 255.0
    mean, std = test_loader.mean, test_loader.std
    out = {}
    with torch.no_grad():
        if eval_cfg.corruptions:
            suite = corruption_suite(lambda x: log_probs(standardize(x, mean, std)), x01,
                                     labels, batch_size=eval_cfg.eval_batch_size)
            out.update({f"corr_{k}": v for k, v in suite["mean"].items()})
            out["corruptions"] = suite["by_corruption"]
        if eval_cfg.ood:
            ood = ood_images(eval_cfg.ood, eval_cfg.ood_root, tuple(images.shape[1:]), n,
                             getattr(test_loader, "spec", None)).to(images.device)
            p_in = _probs(log_probs, standardize(x01, mean, std), eval_cfg.eval_batch_size)
            p_out = _probs(log_probs, standardize(ood, mean, std), eval_cfg.eval_batch_size)
            out.update({f"ood_{k}": v for k, v in ood_metrics(p_in, p_out).items()})
    return out


def _probs(log_probs, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([log_probs(x[i:i + batch_size]).float().softmax(-1) for i in range(0, len(x), batch_size)])


def test_images(loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images as uint8 (n, C, H, W) and their labels: held, or streamed views."""
    if getattr(loader, "images", None) is not None:
        return loader.images[:n], loader.labels[:n]
    if hasattr(loader, "eval_views"):
        return loader.eval_views(n)
    raise ValueError("eval.corruptions and eval.ood need image test data (held in memory or streamed from an "
                     "image folder or tar shards), not video or feature data")


@lru_cache(maxsize=4)
def ood_images(name: str, root: str | None, shape: tuple[int, int, int], limit: int,
               spec: ViewSpec | None = None) -> torch.Tensor:
    """Up to `limit` test images of dataset `name` as [0, 1] floats of `shape` (C, H, W): a streamed
    dataset through the eval views `spec` (the test split's; default: `shape`'s size), a held one
    resized (bilinear); both converted between grey and colour (channel mean or repeat)."""
    if name in STREAMED_DATASETS:
        if root is None:
            raise ValueError(f"eval.ood={name} needs eval.ood_root: the folder with train/ and test/ (or val/)")
        spec = spec or ViewSpec(train="none", size=shape[1])
        test = (list_tar_shards if name == "tar-shards" else list_image_folder)(root, spec.size)[1]
        loader = StreamLoader(test, batch_size=256, mean=(0.0,) * 3, std=(1.0,) * 3, spec=spec, train=False)
        x = loader.eval_views(limit)[0].cpu().float() / 255.0
    else:
        x = load_dataset(name, root=root, val_fraction=0.0).test.images[:limit].float() / 255.0
    c, h, w = shape
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True) if c == 1 else x.mean(1, keepdim=True).expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0).contiguous()


__all__ = ["ood_images", "robustness_fields", "test_images"]
