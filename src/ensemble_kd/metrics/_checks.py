"""Input checks shared by the metric functions."""

from __future__ import annotations

import torch

# Probabilities are clamped at EPS before a log: a model that gives the true class
# probability 0 then costs -log(1e-12) ≈ 27.6 nats instead of an infinite NLL.
EPS = 1e-12


def check_labels(labels, num_rows: int, num_classes: int, device: torch.device, *, name: str) -> torch.Tensor:
    """Validate (B,) integer labels against B rows of K classes; return them as int64 on `device`."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}; pass one class index per sample.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}; convert with labels.long().")
    if labels.shape[0] != num_rows:
        raise ValueError(f"{name} has {num_rows} rows but labels has {labels.shape[0]} entries; they must match.")
    labels = labels.to(device=device, dtype=torch.int64)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels contain {bad}, outside 0..{num_classes - 1} for {num_classes} classes.")
    return labels


def _check_matrix(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (B, K), got {tuple(x.shape)}; pass one row per sample.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}; pass model outputs, not labels.")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); metrics need at least one sample and class.")
    return x


def check_probs_labels(probs, labels, *, name: str = "probs") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (B, K) probability tensor and (B,) integer labels; return them as tensors.

    Rows that do not sum exactly to 1 are accepted (float rounding, averaged ensembles);
    NaN/inf and negative entries are not, since they mean logits or a diverged model.
    """
    probs = _check_matrix(probs, name)
    labels = check_labels(labels, probs.shape[0], probs.shape[1], probs.device, name=name)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{name} contains NaN or inf; check the model outputs (diverged training?).")
    if bool((probs < 0).any()):
        raise ValueError(f"{name} contains negative entries; pass probabilities (softmax of logits), not logits.")
    return probs, labels


def check_logits_labels(logits, labels, *, name: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (B, K) logits and (B,) labels; -inf is allowed (log of a zero probability)."""
    logits = _check_matrix(logits, name)
    labels = check_labels(labels, logits.shape[0], logits.shape[1], logits.device, name=name)
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise ValueError(f"{name} contains NaN or +inf; check the model outputs (diverged training?).")
    if bool(torch.isneginf(logits).all(dim=1).any()):
        raise ValueError(f"{name} has a row that is -inf everywhere; every sample needs one finite logit.")
    return logits, labels
