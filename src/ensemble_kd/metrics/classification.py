"""Accuracy, NLL and Brier score of predicted probabilities, and the combined metric dict."""

from __future__ import annotations

import torch

from ._checks import EPS, check_logits_labels, check_probs_labels
from .calibration import expected_calibration_error
from .temperature import finite_logits, fit_temperature, probs_to_logits, temperature_at_bound


def top_k_accuracy(probs, labels, k: int = 1) -> float:
    """Fraction (0..1) of samples whose label is among the k most probable classes.

    Ties are broken by torch.topk's order (deterministic for a given tensor).
    """
    probs, labels = check_probs_labels(probs, labels)
    num_classes = probs.shape[1]
    if not 1 <= int(k) <= num_classes:
        raise ValueError(f"k={k} must be between 1 and the number of classes ({num_classes}).")
    top = probs.topk(int(k), dim=1).indices
    hit = (top == labels[:, None]).any(dim=1)
    return float(hit.double().mean())


def negative_log_likelihood(probs, labels) -> float:
    """Mean -log p(label) in nats; probabilities are clamped at 1e-12 so the result is finite."""
    probs, labels = check_probs_labels(probs, labels)
    p_true = probs.double().gather(1, labels[:, None]).squeeze(1)
    return float(-p_true.clamp_min(EPS).log().mean())


def brier_score(probs, labels) -> float:
    """Squared error to the one-hot label, summed over classes, averaged over samples (0..2)."""
    probs, labels = check_probs_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(dim=1).mean())


def classification_metrics(
    probs,
    labels,
    *,
    val_logits=None,
    val_labels=None,
    test_logits=None,
    n_bins: int = 15,
) -> dict[str, float | bool]:
    """All test-set metrics of one model (or ensemble) as a dict of floats (and one flag).

    Keys: acc, top5 (only when there are at least 5 classes: with fewer it is
    trivially 1), nll, ece, brier. With val_logits/val_labels also: temperature
    (fitted on the validation split), cnll and cece (NLL and ECE of
    softmax(test_logits / T)), and the flag temperature_at_bound: True when T is a
    bound of the fit's range, so cnll and cece are not identifiable (they depend on
    the bound; see temperature_at_bound). test_logits defaults to log(probs), which is the
    right choice for an ensemble (log of the mean probabilities); test_logits is
    ignored without validation data.
    """
    probs, labels = check_probs_labels(probs, labels)
    out: dict[str, float | bool] = {"acc": top_k_accuracy(probs, labels, 1)}
    if probs.shape[1] >= 5:
        out["top5"] = top_k_accuracy(probs, labels, 5)
    out["nll"] = negative_log_likelihood(probs, labels)
    out["ece"] = expected_calibration_error(probs, labels, n_bins=n_bins)
    out["brier"] = brier_score(probs, labels)
    if val_logits is None and val_labels is None:
        return out
    if val_logits is None or val_labels is None:
        missing = "val_labels" if val_labels is None else "val_logits"
        raise ValueError(f"{missing} is missing; pass both val_logits and val_labels to get calibrated metrics.")
    temperature = fit_temperature(val_logits, val_labels)
    if test_logits is None:
        test_logits = probs_to_logits(probs)
    test_logits, _ = check_logits_labels(test_logits, labels, name="test_logits")
    if test_logits.shape[1] != probs.shape[1]:
        raise ValueError(
            f"test_logits has {test_logits.shape[1]} classes but probs has {probs.shape[1]}; they must match."
        )
    scaled = torch.softmax(finite_logits(test_logits.double()) / temperature, dim=1)
    out["temperature"] = temperature
    out["temperature_at_bound"] = temperature_at_bound(temperature)
    out["cnll"] = negative_log_likelihood(scaled, labels)
    out["cece"] = expected_calibration_error(scaled, labels, n_bins=n_bins)
    return out

