"""Seeded mixup and CutMix: partner, ratio and box of each sample are a pure function of (seed, epoch, index).

Sample i mixes (with probability mix_prob) with the view of partner j = another dataset index
drawn from the hash, with λ ~ Beta(α, α) drawn by inverse CDF from the hash; with both alphas
set, CutMix is chosen for half of the mixed samples (as timm's switch_prob=0.5). CutMix's λ is
then corrected to the pasted box's area. Targets become λ·onehot(y_i) + (1-λ)·onehot(y_j). The
same draws on every device, for every batch layout: the teacher cache replays mixed views exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .views import hash_ints

__all__ = ["MixSpec", "MixParams", "mix_params", "mix_views"]

_STREAM_MIX, _STREAM_APPLY, _STREAM_PARTNER, _STREAM_SWITCH, _STREAM_LAM, _STREAM_CY, _STREAM_CX = (
    0x8E5, 0x9F6, 0xA07, 0xB18, 0xC29, 0xD3A, 0xE4B)
_QUANTILE_POINTS = 4097  # λ = the Beta quantile function, linearly interpolated between these points


@dataclass(frozen=True)
class MixSpec:
    """mixup_alpha, cutmix_alpha: Beta(α, α) concentrations (0: off); mix_prob: the chance a sample mixes."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    def __post_init__(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ValueError(f"views.{key} must be >= 0 (0: off), got {getattr(self, key)!r}.")
        if not 0 <= self.mix_prob <= 1:
            raise ValueError(f"views.mix_prob must be in [0, 1], got {self.mix_prob!r}.")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


class MixParams(NamedTuple):
    """Per sample: partner index, weight λ of the sample itself, CutMix flag, pasted box (y0, y1, x0, x1)."""

    partner: torch.Tensor
    lam: torch.Tensor
    cutmix: torch.Tensor
    box: torch.Tensor


@lru_cache(maxsize=8)
def _beta_quantiles(alpha: float) -> torch.Tensor:
    """Beta(α, α)'s quantile function at evenly spaced probabilities, float64 on the CPU."""
    from scipy.special import betaincinv  # scipy comes with scikit-learn

    u = torch.linspace(0.0, 1.0, _QUANTILE_POINTS, dtype=torch.float64).numpy()
    return torch.from_numpy(betaincinv(alpha, alpha, u)).clamp_(0.0, 1.0)


def _uniform(h: torch.Tensor, stream: int) -> torch.Tensor:
    return hash_ints(h, stream).to(torch.float64) / 4294967296.0


@lru_cache(maxsize=8)
def _beta_quantiles_on(alpha: float, device: torch.device) -> torch.Tensor:
    """The table on `device`, copied there once: a blocking copy every batch would stall the host."""
    return _beta_quantiles(alpha).to(device, non_blocking=True)  # a pageable source: staged before returning


def _beta(alpha: float, u: torch.Tensor) -> torch.Tensor:
    table = _beta_quantiles_on(float(alpha), u.device)
    pos = u * (_QUANTILE_POINTS - 1)
    lo = pos.floor().long().clamp_(max=_QUANTILE_POINTS - 2)
    frac = pos - lo
    return table[lo] * (1 - frac) + table[lo + 1] * frac


def mix_params(index: torch.Tensor, *, epoch: int, seed: int, num_samples: int, height: int, width: int,
               spec: MixSpec) -> MixParams:
    """The mixing of each sample `index` (int64, any device) in a dataset of `num_samples` (H x W views).

    A sample that does not mix gets itself as partner and λ = 1.
    """
    index = index.to(torch.int64)
    h = hash_ints(seed, epoch, index, _STREAM_MIX)
    mixes = (_uniform(h, _STREAM_APPLY) < spec.mix_prob) & (num_samples > 1)
    # Another index, never the sample itself: i + 1 + (hash mod N-1), modulo N.
    other = (index + 1 + hash_ints(h, _STREAM_PARTNER) % max(num_samples - 1, 1)) % num_samples
    partner = torch.where(mixes, other, index)
    if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
        cutmix = _uniform(h, _STREAM_SWITCH) < 0.5
    else:
        cutmix = torch.full_like(mixes, spec.cutmix_alpha > 0)
    cutmix &= mixes
    u = _uniform(h, _STREAM_LAM)
    lam = torch.ones_like(u)
    if spec.mixup_alpha > 0:
        lam = torch.where(mixes & ~cutmix, _beta(spec.mixup_alpha, u), lam)
    if spec.cutmix_alpha > 0:
        lam = torch.where(cutmix, _beta(spec.cutmix_alpha, u), lam)
    # CutMix's box (timm's rand_bbox): sides sqrt(1-λ) of the image's, centered at a hashed pixel, clipped.
    cut = (1 - lam).clamp_min(0).sqrt()
    cut_h, cut_w = (height * cut).long(), (width * cut).long()
    cy, cx = hash_ints(h, _STREAM_CY) % height, hash_ints(h, _STREAM_CX) % width
    y0, y1 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x0, x1 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    box = torch.stack([y0, y1, x0, x1], dim=1)
    box = torch.where(cutmix[:, None], box, torch.zeros_like(box))
    area = ((y1 - y0) * (x1 - x0)).to(torch.float64) / (height * width)
    lam = torch.where(cutmix, 1 - area, lam)  # λ is the area the sample itself keeps
    return MixParams(partner, lam, cutmix, box)


def mix_views(x: torch.Tensor, partner_x: torch.Tensor, y: torch.Tensor, partner_y: torch.Tensor,
              params: MixParams, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed inputs, soft targets (B, K) float32) from the samples' views x, their partners' views and labels."""
    b, _, height, width = x.shape
    # The parameters are made where the indices are (non_blocking: no wait should they be on the host).
    lam = params.lam.to(device=x.device, dtype=torch.float32, non_blocking=True)
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    y0, y1, x0, x1 = (params.box[:, k].to(x.device, non_blocking=True).view(b, 1, 1) for k in range(4))
    pasted = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).unsqueeze(1)  # (B, 1, H, W)
    blended = x * lam.view(b, 1, 1, 1) + partner_x * (1 - lam).view(b, 1, 1, 1)
    mixed = torch.where(params.cutmix.to(x.device, non_blocking=True).view(b, 1, 1, 1), torch.where(pasted, partner_x, x), blended)
    target = (F.one_hot(y, num_classes).float() * lam[:, None]
              + F.one_hot(partner_y, num_classes).float() * (1 - lam)[:, None])
    return mixed, target
