"""An image folder with val/ beside test/ calibrates on its own val/ (not on train images that pretrained
teachers may have learnt), in memory and streamed, and the table says where the temperature was fitted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.models import create
from ensemble_kd.report import load_results, write_results

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    make_image_folder(root, sizes=(12, 12), modes=("RGB",), per_class=10, test_per_class=3, seed=0)
    make_image_folder(root / "v", sizes=(12, 12), modes=("RGB",), per_class=1, test_per_class=2, seed=1,
                      test_dir="val")
    (root / "v" / "val").rename(root / "val")  # train/ (30), test/ (9), val/ (6)
    return root


def _data(root, *extra):
    return pipeline.prepare_data(load_config(None, ["device=cpu", "data.name=image-folder", f"data.root={root}",
                                                    "data.workers=0", "data.views.size=12", "data.val_fraction=0.2",
                                                    "eval.cost=false", *extra]))


@pytest.mark.parametrize("storage", ["memory", "stream"])
def test_the_folders_own_val_is_the_calibration_split(three_splits, storage):
    data = _data(three_splits, f"data.storage={storage}")
    s = data.splits
    assert (len(s.train), len(s.val), len(s.test)) == (30, 6, 9)  # train whole: val_fraction not carved from it
    assert data.calibration_split() == f"{three_splits / 'val'} (6 images)"


def test_without_a_test_folder_val_is_the_test_split_and_calibration_is_carved_from_train(tmp_path):
    make_image_folder(tmp_path, sizes=(12, 12), modes=("RGB",), per_class=10, test_per_class=2, test_dir="val")
    data = _data(tmp_path)
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (24, 6, 6)
    assert data.calibration_split() == "0.2 of train (data.val_fraction, data.split_seed=0)"


def test_the_table_says_where_the_temperature_was_fitted(three_splits, tmp_path):
    data = _data(three_splits)
    teachers = TeacherSet([create("small_cnn", num_classes=3, in_channels=3, width=0.25) for _ in range(2)])
    rows = pipeline.evaluate_teachers(data.config, teachers, data)
    assert [r.get("calibration_split") for r in rows] == [data.calibration_split()] * 3 + [None]  # no vote cNLL
    write_results(tmp_path, rows)
    note = f"cNLL and cECE: temperature fitted on {three_splits / 'val'} (6 images)"
    assert note in (tmp_path / "results.md").read_text().splitlines()
    assert load_results(tmp_path)[0]["calibration_split"] == data.calibration_split()


def test_tar_shards_with_val_beside_test_calibrate_on_val(tmp_path):
    from _images import make_tar_shards

    make_tar_shards(tmp_path, shards=2, test_shards=1, sizes=(12, 12))
    make_tar_shards(tmp_path / "v", shards=1, test_shards=1, sizes=(12, 12), seed=1)
    (tmp_path / "v" / "test").rename(tmp_path / "val")  # train/ 20, test/ 10, val/ 10 samples
    data = pipeline.prepare_data(load_config(None, ["device=cpu", "data.name=tar-shards", f"data.root={tmp_path}",
                                                    "data.workers=0", "data.views.size=12", "data.val_fraction=0.2"]))
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (20, 10, 10)
    assert data.calibration_split() == f"{tmp_path / 'val'} (10 images)"
