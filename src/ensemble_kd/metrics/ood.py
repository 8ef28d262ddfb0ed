"""Out-of-distribution detection: AUROC of confidence scores on in- vs out-of-distribution data.

A classifier that knows what it does not know should be less confident on inputs from
another data set (e.g. SVHN for a CIFAR-10 model). The score functions map predicted
probabilities to a confidence per sample (higher = more in-distribution); `auroc` is
the probability that a random in-distribution sample scores above a random OOD sample,
ties counting 1/2 (0.5 = chance, 1.0 = perfect separation).
"""

from __future__ import annotations

import torch

from ._checks import _check_matrix


def _check_scores(scores, name: str) -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got shape {tuple(scores.shape)}.")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got {scores.dtype}.")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN; a NaN score cannot be ranked.")
    return scores


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve = P(score_in > score_out) + P(tie) / 2 (Mann-Whitney U / (n_in n_out)).

    Exact: ranks come from one sort of the pooled scores (tied scores share their
    average rank), and the rank sum is kept in integers as twice the ranks.
    """
    s_in = _check_scores(scores_in, "scores_in")
    s_out = _check_scores(scores_out, "scores_out").to(s_in.device)
    pooled = torch.cat([s_in.double(), s_out.double()])
    _, group, counts = torch.unique(pooled, sorted=True, return_inverse=True, return_counts=True)
    # Group g holds ranks end - count + 1 .. end (1-based); twice their mean is 2 end - count + 1.
    twice_rank = 2 * torch.cumsum(counts, 0) - counts + 1
    n_in, n_out = s_in.shape[0], s_out.shape[0]
    twice_u = int(twice_rank[group[:n_in]].sum()) - n_in * (n_in + 1)
    return twice_u / (2 * n_in * n_out)


def _check_probs(probs, name: str) -> torch.Tensor:
    probs = _check_matrix(probs, name)
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError(f"{name} must hold finite non-negative probabilities; pass softmax outputs, not logits.")
    return probs


def max_probability(probs) -> torch.Tensor:
    """Maximum softmax probability per row, (N, K) -> (N,) (Hendrycks & Gimpel's baseline)."""
    return _check_probs(probs, "probs").max(dim=1).values


def negative_entropy(probs) -> torch.Tensor:
    """sum_k p_k log p_k per row, (N, K) -> (N,), in nats (0 log 0 = 0); 0 for a one-hot row."""
    probs = _check_probs(probs, "probs")
    return torch.special.xlogy(probs, probs).sum(dim=1)


def ood_metrics(probs_in, probs_out) -> dict[str, float]:
    """AUROC of max probability and of negative entropy, in-distribution vs OOD probabilities."""
    probs_in, probs_out = _check_probs(probs_in, "probs_in"), _check_probs(probs_out, "probs_out")
    if probs_in.shape[1] != probs_out.shape[1]:
        raise ValueError(
            f"probs_in has {probs_in.shape[1]} classes but probs_out has {probs_out.shape[1]}; they must match."
        )
    return {
        "auroc_maxprob": auroc(max_probability(probs_in), max_probability(probs_out)),
        "auroc_entropy": auroc(negative_entropy(probs_in), negative_entropy(probs_out)),
    }
