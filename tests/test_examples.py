"""The example data generators write what the README says and the library reads it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from ensemble_kd.data.decode import open_rgb
from ensemble_kd.data.samples import list_image_folder

sys.path.insert(0, str(Path(__file__).parent))
from _scripts import load_script  # noqa: E402


def _load(name: str):
    return load_script("examples", name)


def test_imagenet_style_folder_is_listed_with_every_class_and_variable_sizes(tmp_path):
    make = _load("make_imagenet_style")
    make.make_folder(tmp_path, classes=10, train=3, val=1, lo=20, hi=40)
    train, test = list_image_folder(tmp_path, 16)
    assert (len(train), len(test)) == (30, 10)
    assert train.classes == tuple(make.class_names(10)) and (tmp_path / "val").is_dir()
    assert sorted(set(train.labels.tolist())) == list(range(10))
    sides = {open_rgb(train.read(i), train.describe(i)).size for i in range(len(train))}
    assert len(sides) > 1 and all(20 <= s <= 40 for side in sides for s in side)


def test_imagenet_style_odd_modes_decode_to_rgb():
    make = _load("make_imagenet_style")
    image = make.draw_image(3, np.random.default_rng(0), 30, 30)
    modes = []
    for roll, fmt in ((0.005, "JPEG"), (0.015, "PNG"), (0.025, "JPEG"), (0.5, "JPEG")):
        odd = make._odd_mode(image, roll)
        modes.append(odd.mode)
        buf = io.BytesIO()
        odd.save(buf, format=fmt)
        assert open_rgb(buf.getvalue(), "x").mode == "RGB"
    assert modes == ["L", "P", "CMYK", "RGB"]
