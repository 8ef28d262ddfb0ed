"""Multi-label ranking metrics: YouTube-8M's global average precision (GAP@k) and mean AP.

GAP@k pools every item's k highest-scored classes into one list, ranks it by score and takes
the average precision of that list against *all* positive labels (an item's positives outside
its top k count as misses), as the official yt8m `eval_util.calculate_gap` does. mAP is the
per-class average precision over the ranking of items, averaged over classes that have a
positive. Both are non-interpolated: AP = sum_i precision@i * rel_i / P. Tied scores are
ranked by position (item, then class) rather than averaged, so give ties-free scores when
comparing with tools that break ties otherwise.
"""

from __future__ import annotations

import torch


def _check_scores_labels(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) finite float scores and (N, C) labels in {0, 1}, both as float64 tensors."""
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels)
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must have shape (N, C) with N, C >= 1, got {tuple(scores.shape)}.")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating array, got {scores.dtype}; pass model scores, not labels.")
    if labels.shape != scores.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but scores has {tuple(scores.shape)}; "
                         f"they must match.")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contains NaN or inf; check the model outputs (diverged training?).")
    labels = labels.to(device=scores.device, dtype=torch.float64)
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be multi-hot: every entry 0 or 1.")
    return scores.double(), labels


def _average_precision(ranked_labels: torch.Tensor, num_positives: torch.Tensor) -> torch.Tensor:
    """AP of each row of 0/1 labels already in ranked order, against num_positives per row."""
    hits = ranked_labels.cumsum(-1)
    rank = torch.arange(1, ranked_labels.shape[-1] + 1, device=ranked_labels.device, dtype=torch.float64)
    return (hits / rank * ranked_labels).sum(-1) / num_positives


def global_average_precision(scores, labels, top_k: int = 20) -> float:
    """GAP@top_k: AP of all items' top_k predictions pooled, over all positives; 0.0 when there are none."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    scores, labels = _check_scores_labels(scores, labels)
    num_positives = labels.sum()
    if num_positives == 0:
        return 0.0
    kept, cls = scores.topk(min(top_k, scores.shape[1]), dim=1)
    kept_labels = labels.gather(1, cls).flatten()
    # A stable sort keeps tied predictions in (item, rank) order, so the result is deterministic.
    order = kept.flatten().argsort(descending=True, stable=True)
    return float(_average_precision(kept_labels[order], num_positives))


def mean_average_precision(scores, labels) -> float:
    """Mean over classes with >= 1 positive of the AP of ranking the items by that class's score."""
    scores, labels = _check_scores_labels(scores, labels)
    num_positives = labels.sum(0)
    has_positive = num_positives > 0
    if not bool(has_positive.any()):
        raise ValueError("no class has a positive label; mean average precision is undefined.")
    order = scores.argsort(dim=0, descending=True, stable=True)
    ap = _average_precision(labels.gather(0, order).T, num_positives)
    return float(ap[has_positive].mean())
