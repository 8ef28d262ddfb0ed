"""Architectures, a registry to build them by name, and taps (named intermediate outputs).

    model = create("resnet20", num_classes=10, in_channels=3)
    logits, feats = forward_with_taps(model, x, default_taps(model))
    same = create(**model.spec)
"""

from __future__ import annotations

# Importing the architecture files registers their models.
from . import densenet, googlenet, mobilenet, mobilenetv2, resnet_cifar, shake_shake, small, vgg, wrn  # noqa: F401
from . import video  # noqa: F401
from . import multihead  # noqa: F401  (after the bases it builds on)
from . import batchensemble  # noqa: F401  (after the bases it builds on)
from .registry import create, list_models, models_by_source, register_model
from .taps import LOGITS, default_taps, forward_with_taps, resolve_module, unwrap

__all__ = [
    "LOGITS",
    "create",
    "default_taps",
    "forward_with_taps",
    "list_models",
    "models_by_source",
    "register_model",
    "resolve_module",
    "unwrap",
]
