"""The loop alone: devices, precision, checkpoints, resume, logs; it runs any method through its contract."""

from .checkpoint import CheckpointError, atomic_save, load_model, load_train_state, save_model
from .seeding import resolve_device, seed_everything
from .trainer import NonFiniteLossError, Trainer

__all__ = ["CheckpointError", "NonFiniteLossError", "Trainer", "atomic_save", "load_model",
           "load_train_state", "resolve_device", "save_model", "seed_everything"]
