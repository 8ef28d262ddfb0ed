"""Input perturbations for distillation: one function per kind, one registry (base.py)."""

from .base import PERTURBATIONS, Draw, Perturbation, normalised, register_perturbation
from . import gaussian, ods, tdiv_sdiv  # noqa: F401  (registers)
from .ods import ods_delta
from .tdiv_sdiv import tdiv_sdiv_delta

__all__ = ["PERTURBATIONS", "Draw", "Perturbation", "normalised", "ods_delta", "register_perturbation",
           "tdiv_sdiv_delta"]
