"""Reports: result tables (markdown, rich, results.md/json) and figures (PNG)."""

from __future__ import annotations

from .plots import (accuracy_vs_cost, accuracy_vs_cost_figure, reliability_diagram, reliability_figure,
                    teacher_weights_over_training)
from .tables import (COLUMNS, HEADERS, MARK, TEMPERATURE_NOTE, format_value, load_results, markdown_table, print_table,
                     write_results)

__all__ = [
    "COLUMNS",
    "HEADERS",
    "MARK",
    "TEMPERATURE_NOTE",
    "accuracy_vs_cost",
    "accuracy_vs_cost_figure",
    "format_value",
    "load_results",
    "markdown_table",
    "print_table",
    "reliability_diagram",
    "reliability_figure",
    "teacher_weights_over_training",
    "write_results",
]
