"""Evaluation as the papers do it: metrics rows for members, ensembles and students; robustness."""

from .evaluate import evaluate_model, evaluate_multilabel, evaluate_teacher_set, predict
from .robustness import ood_images, robustness_fields

__all__ = ["evaluate_model", "evaluate_multilabel", "evaluate_teacher_set", "ood_images", "predict",
           "robustness_fields"]
