"""What one reproduction is: a paper's table, the config that runs it, and the paper's figures per cell.

A cell is (row, column) of the paper's table. Its figure comes from a sweep variant (a student) or
from the teachers (`teachers`: the ensemble of the first M members, `vote` or `ensemble` row, or one
member). `paper` is None where the paper's text lost the figure (MEAL's Tables 1-3): the cell runs
and is shown with no difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The repository (configs/ beside src/) of an editable or source install.
REPO = Path(__file__).resolve().parents[3]

# How a results row's value becomes the paper's figure: (row key, scale, from 100 - value).
METRICS = {
    "acc": ("acc", 100.0, False), "top5": ("top5", 100.0, False),
    "err": ("acc", 100.0, True), "err5": ("top5", 100.0, True),
    "nll": ("nll", 1.0, False), "ece": ("ece", 1.0, False), "cnll": ("cnll", 1.0, False),
    "cece": ("cece", 1.0, False), "gap": ("gap", 100.0, False), "map": ("map", 100.0, False),
}


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    paper: float | None  # the paper's figure, in its units (% for accuracies and errors)
    metric: str = "acc"
    variant: str | None = None  # the sweep variant whose (seed-mean) row gives ours
    teachers: tuple[str, int] | None = None  # ("vote" | "ensemble" | "member", M): a teacher row instead

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"cell ({self.row}, {self.column}): unknown metric {self.metric!r}")
        if (self.variant is None) == (self.teachers is None):
            raise ValueError(f"cell ({self.row}, {self.column}): give a variant or a teacher row, one of them")

    def ours(self, row: dict) -> float | None:
        key, scale, complement = METRICS[self.metric]
        value = row.get(key)
        if value is None:
            return None
        return scale * (1.0 - value) if complement else scale * value


@dataclass(frozen=True)
class Size:
    """A model the paper sizes, in its own convention (the entry's folded_params and flops_are_macs):
    `params` in millions, `flops` in billions."""
    model: str  # the sweep variant whose student it is
    params: float | None = None
    flops: float | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    paper: str
    table: str
    rows: str  # the table's rows and columns, in words
    config: str  # configs/..., relative to the repository
    cells: tuple[Cell, ...]
    budget: dict  # the paper's training budget by config key, e.g. {"student.train.epochs": 350}
    num_classes: int
    input_shape: tuple[int, ...]
    sizes: tuple[Size, ...] = ()
    folded_params: bool = False  # EnsembleNet counts parameters with batch norm folded
    flops_are_macs: bool = True  # EnsembleNet's FLOPs are tensorflow.profiler's: 2 per multiply-add
    notes: tuple[str, ...] = ()  # what did not survive, what cannot run, where a setting comes from
    needs: tuple[str, ...] = field(default=())  # model names / method options from branches not yet merged
    train_images: int | None = None  # the paper's training set, for the training compute in the listing

    @property
    def config_path(self) -> Path:
        """The config file: in the repository this package runs from, else relative to the current directory."""
        path = REPO / self.config
        return path if path.is_file() else Path(self.config)

    def figures_summary(self) -> str:
        given = [c for c in self.cells if c.paper is not None]
        if not given:
            return "no numeric cell survived in the text"
        shown = ", ".join(f"{c.row}/{c.column} {c.paper:g}" for c in given[:3])
        more = f" (+{len(given) - 3} more)" if len(given) > 3 else ""
        return shown + more
