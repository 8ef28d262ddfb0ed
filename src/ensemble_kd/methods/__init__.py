"""Distillation methods: one file per method, one contract, one registry."""

from .base import (METHODS, Method, MethodLoss, Needs, StudentOutput, TeacherOutput,
                   create_method, known_methods, method_class, register_method)
from . import aekd, ce, ensemblenet, kd, latentbe, meal  # noqa: F401  (registers)

__all__ = ["METHODS", "Method", "MethodLoss", "Needs", "StudentOutput", "TeacherOutput",
           "create_method", "known_methods", "method_class", "register_method"]
