"""data.storage: auto holds a one-size image folder in memory at that size, large folders too (their
sizes guessed from a seeded sample of headers and checked while loading), and says why in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data import ImageDataset, storage
from ensemble_kd.data.samples import ImageFiles, list_image_folder

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402

COUNT = 3 * 8 + 3 * 3  # make_image_folder's defaults: 3 classes, 8 train and 3 test images each


def _prepare(root, capsys, *extra):
    config = load_config(None, ["device=cpu", "data.name=image-folder", f"data.root={root}", "data.workers=0",
                                "data.val_fraction=0", *extra])
    splits = pipeline.prepare_data(config).splits
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data.storage auto")]
    return splits, lines


@pytest.fixture
def large(monkeypatch):
    """The folder counts as large: past the header-check limit, sizes come from a sample of 5 headers."""
    monkeypatch.setattr(storage, "HEADER_CHECK_LIMIT", 10)
    monkeypatch.setattr(storage, "SIZE_SAMPLE", 5)
    read = []
    real = storage.check_headers
    monkeypatch.setattr(storage, "check_headers", lambda samples: read.append(len(samples)) or real(samples))
    return read


def test_a_small_one_size_folder_is_held_in_memory_at_its_size_and_says_so(tmp_path, capsys):
    root = make_image_folder(tmp_path, sizes=(12, 12), modes=("RGB",))
    splits, lines = _prepare(root, capsys)  # views.size stays 224: held in memory, trained at 12x12
    assert isinstance(splits.train, ImageDataset) and splits.image_size == (12, 12)
    assert lines == [f"data.storage auto: held in memory and trained at 12x12 (0 MiB decoded): all {COUNT} "
                     f"images are 12x12"]


def test_a_large_one_size_folder_is_held_in_memory_from_a_sample_of_headers(tmp_path, capsys, large):
    root = make_image_folder(tmp_path, sizes=(12, 12), modes=("RGB",))
    splits, lines = _prepare(root, capsys)
    assert isinstance(splits.train, ImageDataset) and splits.image_size == (12, 12)
    assert sum(large) == 5  # five headers read, not every one
    assert len(lines) == 1 and f"the headers of 5 of the {COUNT} images" in lines[0]
    assert "every image's size is checked as it loads" in lines[0]


def test_a_large_folder_with_one_odd_size_the_sample_missed_is_streamed_after_all(tmp_path, capsys, large):
    root = make_image_folder(tmp_path, sizes=(12, 12), modes=("RGB",))
    train, _ = list_image_folder(root, 16)
    picks = np.random.default_rng(0).choice(COUNT, 5, replace=False)  # data.split_seed's sample
    odd = next(i for i in range(len(train)) if i not in picks)
    name = train.name(odd)
    Image.new("RGB", (14, 12), (200, 10, 10)).save(root / name)
    splits, lines = _prepare(root, capsys, "data.views.size=16")
    assert isinstance(splits.train, ImageFiles) and splits.image_size == (16, 16)
    assert "held in memory" in lines[0]
    assert lines[1].startswith("data.storage auto: streamed after all, at views.size=16: image ")
    assert name.split("/")[-1] in lines[1] and "14x12" in lines[1]


def test_a_sample_that_shows_two_sizes_streams(tmp_path, capsys, large):
    root = make_image_folder(tmp_path, sizes=(10, 30), modes=("RGB",))
    splits, lines = _prepare(root, capsys, "data.views.size=16")
    assert isinstance(splits.train, ImageFiles)
    assert len(lines) == 1 and lines[0].startswith("data.storage auto: streamed at views.size: the images differ")


def test_a_folder_over_the_memory_limit_streams_and_says_how_large(tmp_path, capsys, monkeypatch):
    root = make_image_folder(tmp_path, sizes=(12, 12), modes=("RGB",))
    monkeypatch.setattr(storage, "MEMORY_LIMIT_BYTES", 1000)
    splits, lines = _prepare(root, capsys, "data.views.size=16")
    assert isinstance(splits.train, ImageFiles)
    assert lines == [f"data.storage auto: streamed at views.size: {COUNT} images of 12x12 take 0.0 GiB decoded, "
                     f"over the {1000 / 2**30:g} GiB held in memory"]


def test_a_given_storage_says_nothing(tmp_path, capsys):
    root = make_image_folder(tmp_path, sizes=(12, 12), modes=("RGB",))
    splits, lines = _prepare(root, capsys, "data.storage=memory")
    assert isinstance(splits.train, ImageDataset) and lines == []
