"""Numerical solvers the methods call: AE-KD's capped-simplex min-norm weights."""

from .capped_simplex import (DEVICE_SOLVER_MAX_M, SOLVERS, capped_simplex_projection, gram_matrix, teacher_weights,
                             weights_from_gram, weights_from_gram_on_device)

__all__ = ["DEVICE_SOLVER_MAX_M", "SOLVERS", "capped_simplex_projection", "gram_matrix", "teacher_weights",
           "weights_from_gram", "weights_from_gram_on_device"]
