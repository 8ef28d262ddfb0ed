"""Metrics: tensors in, Python floats out (accuracy, NLL, calibration, temperature, cost)."""

from __future__ import annotations

from .calibration import ece_from_bins, expected_calibration_error, reliability_bins
from .classification import brier_score, classification_metrics, negative_log_likelihood, top_k_accuracy
from .corruptions import CORRUPTIONS, corrupt, corruption_suite
from .cost import count_flops, count_macs, count_parameters, eval_mode, measure_latency, measure_throughput
from .multilabel import global_average_precision, mean_average_precision
from .ood import auroc, max_probability, negative_entropy, ood_metrics
from .temperature import finite_logits, fit_temperature, probs_to_logits, temperature_at_bound

__all__ = [
    "CORRUPTIONS",
    "auroc",
    "brier_score",
    "classification_metrics",
    "count_flops",
    "count_macs",
    "corrupt",
    "corruption_suite",
    "count_parameters",
    "ece_from_bins",
    "eval_mode",
    "expected_calibration_error",
    "finite_logits",
    "fit_temperature",
    "global_average_precision",
    "max_probability",
    "mean_average_precision",
    "measure_latency",
    "measure_throughput",
    "negative_entropy",
    "negative_log_likelihood",
    "ood_metrics",
    "probs_to_logits",
    "reliability_bins",
    "temperature_at_bound",
    "top_k_accuracy",
]
