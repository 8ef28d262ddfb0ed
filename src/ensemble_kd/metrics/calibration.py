"""Calibration: reliability bins and expected calibration error (ECE)."""

from __future__ import annotations

import torch

from ._checks import check_probs_labels


def _bin_edges(n_bins: int) -> list[float]:
    if int(n_bins) < 1:
        raise ValueError(f"n_bins={n_bins} must be a positive integer.")
    # i / n is correctly rounded, so an edge equals the float a user types (0.6 == 9 / 15).
    return [i / int(n_bins) for i in range(int(n_bins) + 1)]


def reliability_bins(probs, labels, n_bins: int = 15) -> dict[str, list]:
    """Per-bin statistics of confidence (max probability) in equal-width bins (lo, hi].

    Returns dict(edges: n_bins + 1 floats, confidence: mean confidence per bin,
    accuracy: fraction correct per bin, count: samples per bin (ints)). Bin 0 also
    takes confidence exactly 0. Empty bins report confidence and accuracy 0.0; read
    `count` to tell them apart.
    """
    probs, labels = check_probs_labels(probs, labels)
    edges = _bin_edges(n_bins)
    # Compare in the dtype of the probabilities (float16/bfloat16 go through float32) so
    # that a confidence that is exactly an edge, e.g. 0.6, lands in the bin it closes.
    dtype = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
    conf, pred = probs.to(dtype).max(dim=1)
    edge_t = torch.tensor(edges, dtype=torch.float64).to(device=conf.device, dtype=dtype)
    # bucketize(right=False) gives i with edges[i-1] < conf <= edges[i], i.e. bin i - 1.
    idx = (torch.bucketize(conf, edge_t, right=False) - 1).clamp_(0, int(n_bins) - 1)
    correct = (pred == labels).double()
    count = torch.bincount(idx, minlength=int(n_bins)).double()
    conf_sum = torch.zeros(int(n_bins), dtype=torch.float64, device=conf.device).index_add_(0, idx, conf.double())
    acc_sum = torch.zeros(int(n_bins), dtype=torch.float64, device=conf.device).index_add_(0, idx, correct)
    denom = count.clamp_min(1.0)
    return {
        "edges": edges,
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (acc_sum / denom).tolist(),
        "count": [int(c) for c in count.tolist()],
    }


def ece_from_bins(bins: dict) -> float:
    """ECE = sum_b |B_b| / N * |acc_b - conf_b| from a reliability_bins dict."""
    count = bins["count"]
    total = sum(count)
    if total == 0:
        raise ValueError("the reliability bins hold no samples; ECE needs at least one.")
    return float(sum(n / total * abs(a - c) for n, a, c in zip(count, bins["accuracy"], bins["confidence"])))


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE with n_bins equal-width confidence bins (lo, hi]: sum_b |B_b|/N * |acc_b - conf_b|."""
    return ece_from_bins(reliability_bins(probs, labels, n_bins))
