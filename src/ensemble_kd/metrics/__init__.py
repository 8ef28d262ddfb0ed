"""Metrics: tensors in, Python floats out (accuracy, NLL, calibration, temperature, cost)."""

from __future__ import annotations

from .calibration import ece_from_bins, expected_calibration_error, reliability_bins
from .classification import brier_score, classification_metrics, negative_log_likelihood, top_k_accuracy
from .cost import count_flops, count_parameters, measure_latency, measure_throughput
from .temperature import finite_logits, fit_temperature, probs_to_logits

__all__ = [
    "brier_score",
    "classification_metrics",
    "count_flops",
    "count_parameters",
    "ece_from_bins",
    "expected_calibration_error",
    "finite_logits",
    "fit_temperature",
    "measure_latency",
    "measure_throughput",
    "negative_log_likelihood",
    "probs_to_logits",
    "reliability_bins",
    "top_k_accuracy",
]
