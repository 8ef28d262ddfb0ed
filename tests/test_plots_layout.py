"""Readable figures: label placement, tick text, titles and per-bin counts, checked on the drawn pixels."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ensemble_kd.metrics import reliability_bins
from ensemble_kd.report.layout import box_beside, overlaps, place_labels
from ensemble_kd.report.plots import accuracy_vs_cost_figure, reliability_figure, si_tick, wrap_title

# The demo's table: three pairs of rows share a cost and an accuracy.
DEMO = [("00-small_cnn-s0", 0.98, 4.8e6), ("01-small_cnn-s1", 0.9889, 4.8e6), ("02-small_cnn-s2", 0.98, 4.8e6),
        ("ensemble (M=3)", 0.9889, 14.3e6), ("majority vote (M=3)", 0.9822, 14.3e6),
        ("student alone (small_cnn)", 0.9733, 1.2e6), ("student aver (small_cnn)", 0.9844, 1.2e6),
        ("student aekd (small_cnn)", 0.9911, 1.2e6), ("student meal (small_cnn)", 0.98, 1.2e6),
        ("student ensemblenet (small_cnn)", 0.9822, 1.19e6),
        ("student latentbe (small_cnn) collapsed", 0.9844, 1.2e6),
        ("student latentbe (small_cnn) BE (M=3)", 0.9866, 3.6e6)]  # fmt: skip


def _rows(table, runs=1):
    prefix = (lambda r: f"sweep-variant-{r}: ") if runs > 1 else (lambda r: "")
    rng = random.Random(0)
    return [{"name": prefix(r) + name, "acc": acc if runs == 1 else rng.choice([0.98, 0.9822, 0.9844, 0.9866]),
             "macs": macs} for r in range(runs) for name, acc, macs in table]


def _boxes(artists, renderer):
    return [(b.x0, b.y0, b.x1, b.y1) for b in (a.get_window_extent(renderer) for a in artists)]


def _assert_apart(boxes, what):
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not overlaps(a, b), f"{what} {i} {a} overlaps {what} {j} {b}"


def test_place_labels_keeps_boxes_apart_inside_bounds_and_off_markers():
    rng = random.Random(1)
    anchors = [(rng.uniform(50, 550), rng.uniform(50, 350)) for _ in range(25)]
    anchors += [anchors[0]] * 3  # coincident points each get their own box
    sizes = [(rng.uniform(20, 90), 10.0) for _ in anchors]
    bounds = (0.0, 0.0, 600.0, 400.0)
    boxes = place_labels(anchors, sizes, bounds, marker=4.0)
    assert all(b is not None for b in boxes)
    _assert_apart(boxes, "label")
    for box, (w, h) in zip(boxes, sizes):
        assert bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
        assert (box[2] - box[0], box[3] - box[1]) == pytest.approx((w, h))
        for x, y in anchors:
            assert not overlaps(box, (x - 4, y - 4, x + 4, y + 4))


def test_place_labels_prefers_the_right_of_a_point_and_reports_what_cannot_fit():
    # A lone point: its label sits just right of the marker, centred on it.
    [box] = place_labels([(100.0, 100.0)], [(30.0, 10.0)], (0, 0, 300, 300), marker=4.0, gaps=(2.0,))
    assert box == pytest.approx(box_beside((100.0, 100.0), (30.0, 10.0), (1, 0), 6.0))
    assert box == pytest.approx((106.0, 95.0, 136.0, 105.0))
    # Nine labels on one point with one ring of candidates: the boxes above and below (centred,
    # 20 wide) would touch the diagonal ones, so six sides are usable and three labels are left out.
    boxes = place_labels([(150.0, 150.0)] * 9, [(20.0, 8.0)] * 9, (0, 0, 300, 300), gaps=(2.0,))
    assert sum(b is None for b in boxes) == 3
    _assert_apart([b for b in boxes if b is not None], "label")
    with pytest.raises(ValueError, match="one size per anchor"):
        place_labels([(0.0, 0.0)], [], (0, 0, 1, 1))


@pytest.mark.parametrize("runs", [1, 8])
def test_accuracy_vs_cost_labels_and_ticks_never_collide(runs):
    """The demo (names beside points) and a compare of 8 runs (64 rows: numbers and a key)."""
    rows = _rows(DEMO, runs)
    fig = accuracy_vs_cost_figure(rows)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text()]
    texts = [t.get_text() for t in labels]
    label_boxes = _boxes(labels, renderer)
    _assert_apart(label_boxes, "label")
    for box in label_boxes:  # inside the plot, off every marker
        assert ax.bbox.x0 <= box[0] and box[2] <= ax.bbox.x1 and ax.bbox.y0 <= box[1] and box[3] <= ax.bbox.y1
        for x, y in ax.transData.transform([(r["macs"], 100 * r["acc"]) for r in rows]):
            assert not overlaps(box, (x - 3, y - 3, x + 3, y + 3))
    ticks = [t for t in ax.get_xticklabels() if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <=
             ax.get_xlim()[1]]
    assert len(ticks) >= 2
    _assert_apart(_boxes(ticks, renderer), "tick label")
    if runs == 1:  # every name shown once; rows at one point share a label
        assert sorted("\n".join(texts).split("\n")) == sorted(r["name"] for r in rows)
        assert "00-small_cnn-s0\n02-small_cnn-s2" in texts
    else:  # every row numbered once, its name in the key, the key's columns apart
        numbers = sorted(int(n) for t in texts for n in t.split(","))
        assert numbers == list(range(1, len(rows) + 1))
        key = "\n".join(t.get_text() for t in fig.texts)
        assert all(f"{i + 1}  {r['name']}" in key for i, r in enumerate(rows))
        assert len(fig.texts) == 2
        _assert_apart(_boxes(fig.texts, renderer), "key column")
        assert max(b[2] for b in _boxes(fig.texts, renderer)) <= fig.bbox.x1


@pytest.mark.parametrize("lo,hi", [(1.2e6, 14.3e6), (1e3, 1e9), (0.3, 4.0), (5e6, 5e6)])
def test_cost_axis_ticks_readable_over_any_range(lo, hi):
    rows = [{"name": "a", "acc": 0.9, "macs": lo}, {"name": "b", "acc": 0.95, "macs": hi}]
    fig = accuracy_vs_cost_figure(rows)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticklabels() if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <=
             ax.get_xlim()[1]]
    assert len(ticks) >= 2
    _assert_apart(_boxes(ticks, fig.canvas.get_renderer()), "tick label")
    assert all("times" not in t.get_text() and "^" not in t.get_text() for t in ticks)  # 2M, not 2x10^6


def test_si_tick_and_wrap_title():
    assert [si_tick(x) for x in (2e6, 5e5, 1.5e9, 20, 0.5)] == ["2M", "500K", "1.5G", "20", "0.5"]
    long = "fmnist-sweep-variant-7: student latentbe (small_cnn) collapsed"
    lines = wrap_title(long).split("\n")
    assert len(lines) <= 3 and all(len(line) <= 34 for line in lines)
    assert "".join(lines).replace(" ", "") == long.replace(" ", "")  # cut only at the line breaks
    assert wrap_title("x " * 100).endswith("…")


def _bins_with_counts() -> dict:
    """400 confident samples and one at confidence 0.35: the lonely bin must look different."""
    probs = torch.full((401, 3), 0.0)
    probs[:400] = torch.tensor([0.98, 0.01, 0.01])
    probs[400] = torch.tensor([0.35, 0.33, 0.32])
    return reliability_bins(probs, torch.zeros(401, dtype=torch.long))


@pytest.mark.parametrize("n", [12, 56])
def test_reliability_titles_apart_and_counts_shown(n):
    names = [f"fmnist-sweep-variant-{i // 7}: student latentbe (small_cnn) BE (M=3) {i}" for i in range(n)]
    bins = _bins_with_counts()
    fig = reliability_figure({name: bins for name in names})
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    diagrams, hists = fig.axes[0::2], fig.axes[1::2]
    assert len(diagrams) == n
    titles = [ax.title for ax in diagrams]
    title_boxes = _boxes(titles, renderer)
    _assert_apart(title_boxes, "title")
    axes_boxes = [(a.bbox.x0, a.bbox.y0, a.bbox.x1, a.bbox.y1) for a in fig.axes]
    for t in title_boxes:  # no title runs into any panel or off the figure
        assert all(not overlaps(t, a) for a in axes_boxes)
        assert 0 <= t[0] and t[2] <= fig.bbox.x1 and 0 <= t[1] and t[3] <= fig.bbox.y1
    # Per-bin counts: written on the histogram under each diagram, and the 1-sample bar fainter.
    assert sorted(t.get_text() for t in hists[0].texts) == ["1", "400"]
    heights = sorted(p.get_height() for p in hists[0].patches)
    assert heights == [1, 400]
    lonely, full = sorted(diagrams[0].containers[0], key=lambda p: p.get_x())  # the accuracy bars
    assert lonely.get_alpha() < 0.3 < 0.99 < full.get_alpha() + 1e-9
