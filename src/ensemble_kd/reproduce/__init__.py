"""The papers' experiments as runnable entries: `ensemble-kd reproduce [NAME]`.

Each entry (entry.py) names its paper, table and rows, the config that runs it (a normal config
with a `sweep:` over the table's rows and seeds), the paper's figure per cell and its budget.
"""

from __future__ import annotations

import difflib

from . import aekd, ensemblenet, meal, nam
from .entry import Cell, Entry, Size

ENTRIES: dict[str, Entry] = {e.name: e for module in (aekd, nam, meal, ensemblenet) for e in module.ENTRIES}


def find(name: str) -> Entry:
    if name not in ENTRIES:
        close = difflib.get_close_matches(name, list(ENTRIES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"no reproduction named '{name}'{hint}; `ensemble-kd reproduce` lists them")
    return ENTRIES[name]


__all__ = ["Cell", "ENTRIES", "Entry", "Size", "find"]
