"""Where to put a scatter plot's labels so that no label covers another label or a point.

Pure geometry in display units (pixels, y up): the plot measures each label, this module
picks a box for it beside its point, the plot draws the label in that box.
"""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[float, float, float, float]  # x0, y0, x1, y1

# Sides of a point tried in order of preference: right, above right, above, ... below right.
_DIRECTIONS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))
# Distances (pixels beyond the marker) tried in turn: nearest first, then farther with a leader line.
GAPS = (2.0, 10.0, 22.0, 40.0, 65.0, 100.0)


def overlaps(a: Box, b: Box, pad: float = 0.0) -> bool:
    """True when boxes a and b, each grown by pad/2 on every side, intersect."""
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def _inside(box: Box, bounds: Box) -> bool:
    return box[0] >= bounds[0] and box[1] >= bounds[1] and box[2] <= bounds[2] and box[3] <= bounds[3]


def box_beside(anchor: tuple[float, float], size: tuple[float, float], direction: tuple[int, int],
               distance: float) -> Box:
    """The w x h box whose edge (or corner) nearest the anchor lies `distance` from it in `direction`."""
    (x, y), (w, h), (dx, dy) = anchor, size, direction
    x0 = x + distance if dx > 0 else x - distance - w if dx < 0 else x - w / 2
    y0 = y + distance if dy > 0 else y - distance - h if dy < 0 else y - h / 2
    return (x0, y0, x0 + w, y0 + h)


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], bounds: Box,
                 marker: float = 4.0, pad: float = 2.0, gaps: Sequence[float] = GAPS) -> list[Box | None]:
    """A box for each label, beside its anchor, inside `bounds`, clear of every other label and of
    every anchor's marker (a square of half-side `marker`); None where no candidate is clear.

    Greedy: the most crowded anchors choose first, each taking the nearest clear candidate.
    """
    if len(anchors) != len(sizes):
        raise ValueError(f"{len(anchors)} anchors but {len(sizes)} label sizes; give one size per anchor.")
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in anchors]
    reach = 4 * max([max(w, h) for w, h in sizes] or [0.0])

    def crowd(i: int) -> int:
        x, y = anchors[i]
        return sum(abs(x - u) < reach and abs(y - v) < reach for u, v in anchors)

    placed: list[Box | None] = [None] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda i: (-crowd(i), i)):
        for gap in gaps:
            candidates = (box_beside(anchors[i], sizes[i], d, marker + gap) for d in _DIRECTIONS)
            box = next((b for b in candidates if _inside(b, bounds)
                        and not any(overlaps(b, m) for m in markers)
                        and not any(p is not None and overlaps(b, p, pad) for p in placed)), None)
            if box is not None:
                placed[i] = box
                break
    return placed
