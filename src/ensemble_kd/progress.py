"""Progress for long loops: lines in logs (no terminal), a rate column for rich's bar.

A task counts steps (batches); `images_per_step=` on `add_task` turns its rate into images/s.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import ProgressColumn
from rich.text import Text

EVERY_S = 30.0  # a log line at least this often, whatever the quarters say


class LineProgress:
    """One line per task at every quarter of the way, and at least every `every_s` seconds, with its
    rate (images/s when the task says its images per step) and the time left. `steps=0`: time lines only."""

    def __init__(self, console: Console, steps: int = 4, every_s: float = EVERY_S, clock=time.perf_counter):
        self.console, self.steps, self.every_s, self.clock, self.tasks = console, steps, every_s, clock, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description, total, completed=0, **fields):
        task = len(self.tasks)
        now = self.clock()
        self.tasks[task] = {"description": description, "total": max(1, total), "completed": completed,
                            "shown": self._quarter(completed, max(1, total)), "started": now, "printed": now,
                            "first": completed, **fields}
        return task

    def _quarter(self, completed, total) -> int:
        return completed * self.steps // total if self.steps else 0

    def update(self, task, advance=0, completed=None, **fields):
        t = self.tasks[task]
        t.update(fields)
        if fields.get("status"):
            t["fresh"] = True  # a status is shown once: a later line without news repeats no stale loss
        if completed is not None:  # a jump (work found done, as a resumed cache's epochs) took no time here
            t["first"] += completed - t["completed"]
        t["completed"] = completed if completed is not None else t["completed"] + advance
        now = self.clock()
        quarter = self._quarter(t["completed"], t["total"])
        if quarter > t["shown"] or (now - t["printed"] >= self.every_s and t["completed"] < t["total"]):
            t["shown"], t["printed"] = max(quarter, t["shown"]), now
            status = f", {t['status']}" if t.get("status") and t.pop("fresh", False) else ""
            self.console.print(f"{t['description']}: {100 * t['completed'] / t['total']:.0f}% "
                               f"({t['completed']}/{t['total']} steps, {now - t['started']:.0f} s"
                               f"{_rate_and_eta(t, now)}{status})", highlight=False)


def _rate_and_eta(t: dict, now: float) -> str:
    """', 412 images/s, 3 min left' from the steps done since the task began (a resumed task's earlier
    steps took no time here); empty before the first step."""
    done, elapsed = t["completed"] - t["first"], now - t["started"]
    if done <= 0 or elapsed <= 0:
        return ""
    per_s = done / elapsed
    per_step = t.get("images_per_step")
    rate = f"{_figure(per_s * per_step)} images/s" if per_step else f"{per_s:.2f} steps/s"
    left = t["total"] - t["completed"]
    return f", {rate}" + (f", {_duration(left / per_s)} left" if left > 0 else "")


def _figure(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ImagesPerSecond(ProgressColumn):
    """The bar's rate: images/s for a task that gives `images_per_step`, else steps/s."""

    def render(self, task) -> Text:
        if not task.speed:
            return Text("")
        per_step = task.fields.get("images_per_step")
        return Text(f"{_figure(task.speed * per_step)} img/s" if per_step else f"{task.speed:.2f} steps/s")


def quiet_progress() -> LineProgress:
    """For loops that run outside a command's progress bar (evaluation): only a line every EVERY_S
    seconds on stderr, so a short run prints nothing and a long one shows it is alive."""
    return LineProgress(Console(stderr=True, width=None if sys.stderr.isatty() else 120), steps=0)
