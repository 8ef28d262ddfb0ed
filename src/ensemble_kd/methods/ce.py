"""Cross-entropy on the labels: a teacher's training, and the student trained alone.

Multi-hot labels (B, K) take the binary cross entropy, summed over the classes.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import Method, MethodLoss, check_label_smoothing, class_targets, register_method, smooth_labels


@register_method("ce")
class CrossEntropy(Method):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = check_label_smoothing(label_smoothing, "ce")

    def loss(self, batch, student, teachers=None) -> MethodLoss:
        if batch.y.dim() == 2:  # multi-hot labels (video): binary cross entropy, summed over classes
            y = smooth_labels(batch.y.float(), self.label_smoothing, multilabel=True)
            loss = F.binary_cross_entropy_with_logits(student.logits.float(), y, reduction="sum") / len(y)
        else:
            loss = F.cross_entropy(student.logits, class_targets(batch), label_smoothing=self.label_smoothing)
        return MethodLoss(loss, {"ce": loss.detach()})
