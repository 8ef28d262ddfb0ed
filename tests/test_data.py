"""Tests for ensemble_kd.data: readers, splits, statistics, seeded views and the device loader."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble_kd.data import (
    AugmentSpec,
    DeviceLoader,
    ImageDataset,
    channel_stats,
    hash_ints,
    list_datasets,
    load_dataset,
    make_view,
    stratified_split,
    view_params,
)
from ensemble_kd.data.formats import read_idx

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- file writers


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_fashion(root: Path, gz: bool = True, n_train: int = 20, n_test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


def cifar_batch(n: int, label_key: str, k: int, rng) -> dict:
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key.encode(): [int(v) for v in np.arange(n) % k],
    }


def make_cifar10(root: Path, n: int = 4, meta: bool = True) -> dict:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(n, "labels", 10, rng)
        with open(root / name, "wb") as f:
            pickle.dump(batches[name], f)
    if meta:
        with open(root / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def make_cifar100(root: Path, n: int = 6) -> dict:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in ("train", "test"):
        batches[name] = cifar_batch(n, "fine_labels", 100, rng)
        batches[name][b"coarse_labels"] = [0] * n
        with open(root / name, "wb") as f:
            pickle.dump(batches[name], f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f)
    return batches


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, size=(5, 7), classes=("cat", "ant"), per_class=2, color=False) -> dict:
    rng = np.random.default_rng(3)
    written = {}
    for split in ("train", "test"):
        for cls in classes:
            for i in range(per_class):
                shape = (size[0], size[1], 3) if color else size
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                save_png(root / split / cls / f"{i}.png", arr)
                written[(split, cls, i)] = arr
    return written


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_idx_fashion_layout_loads(tmp_path, gz):
    src = make_fashion(tmp_path, gz=gz)
    s = load_dataset("fashion-mnist", root=tmp_path, val_fraction=0)
    assert s.val is None
    assert len(s.train) == 20 and len(s.test) == 10
    assert s.in_channels == 1 and s.image_size == (6, 5) and s.num_classes == 10
    assert torch.equal(s.train.images[:, 0], torch.from_numpy(src["train"][0]))
    assert torch.equal(s.test.labels, torch.from_numpy(src["t10k"][1].astype(np.int64)))
    assert s.train.labels.dtype == torch.int64 and s.train.images.dtype == torch.uint8
    assert s.augment == AugmentSpec(2, True)


def test_idx_mixed_gz_and_plain(tmp_path):
    src = make_fashion(tmp_path, gz=True)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.unlink()
    write_idx(tmp_path / "t10k-images-idx3-ubyte", src["t10k"][0], gz=False)
    s = load_dataset("fashion-mnist", root=tmp_path, val_fraction=0)
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(src["t10k"][0]))


def test_fashion_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*root"):
        load_dataset("fashion-mnist", root=tmp_path / "nope")


def test_fashion_missing_file_names_it(tmp_path):
    make_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    labels = np.arange(20, dtype=np.uint8) % 10
    data = idx_bytes(np.zeros((20, 6, 5), np.uint8))[:-7]
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"truncated: its header says 20 items"):
        read_idx(p)
    write_idx(tmp_path / "y", labels, gz=False)
    assert read_idx(tmp_path / "y").tolist() == labels.tolist()


def test_idx_truncated_gzip_stream(tmp_path):
    p = write_idx(tmp_path / "x", np.zeros((20, 6, 5), np.uint8), gz=True)
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(ValueError, match=r"truncated or corrupt gzip"):
        read_idx(p)


def test_idx_bad_magic_and_trailing_bytes(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x12\x34" + idx_bytes(np.zeros((3, 2, 2), np.uint8))[2:])
    with pytest.raises(ValueError, match=r"bad magic number 0x1234"):
        read_idx(p)
    p.write_bytes(idx_bytes(np.zeros((3, 2, 2), np.uint8)) + b"xx")
    with pytest.raises(ValueError, match=r"2 bytes after the 3 items"):
        read_idx(p)


def test_idx_count_mismatch(tmp_path):
    make_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=True)
    with pytest.raises(ValueError, match=r"20 images but .*19 labels"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_idx_label_out_of_range(tmp_path):
    make_fashion(tmp_path)
    labels = np.arange(10, dtype=np.uint8)
    labels[4] = 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=True)
    with pytest.raises(ValueError, match=r"t10k-labels.*label 10 .*10 classes.*mislabelled"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.skipif(
    not FASHION_ROOT.is_dir(),
    reason=f"Fashion-MNIST not installed at {FASHION_ROOT} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    s = load_dataset("fashion-mnist", val_fraction=0)
    assert (len(s.train), len(s.test)) == (60000, 10000)
    assert s.image_size == (28, 28) and s.in_channels == 1 and s.num_classes == 10
    assert torch.equal(torch.unique(s.train.labels), torch.arange(10))
    assert torch.equal(torch.unique(s.test.labels), torch.arange(10))
    assert 0.2 < s.mean[0] < 0.4 and 0.25 < s.std[0] < 0.45


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("layout", ["parent", "extracted"])
def test_cifar10_loads(tmp_path, layout):
    batches = make_cifar10(tmp_path / "cifar-10-batches-py")
    root = tmp_path if layout == "parent" else tmp_path / "cifar-10-batches-py"
    s = load_dataset("cifar10", root=root, val_fraction=0)
    assert len(s.train) == 20 and len(s.test) == 4
    assert s.train.classes == tuple(f"c{i}" for i in range(10))
    assert s.in_channels == 3 and s.image_size == (32, 32)
    # Row layout: 1024 R, then G, then B values, each row-major; batches in order 1..5.
    row = batches["data_batch_2"][b"data"][1]
    img = s.train.images[4 + 1]
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert int(img[c, y, x]) == int(row[c * 1024 + y * 32 + x])
    assert torch.equal(s.test.labels, torch.tensor(batches["test_batch"][b"labels"]))


def test_cifar10_without_meta_uses_standard_names(tmp_path):
    make_cifar10(tmp_path, meta=False)
    s = load_dataset("cifar10", root=tmp_path, val_fraction=0)
    assert s.train.classes[0] == "airplane" and s.num_classes == 10


@pytest.mark.parametrize("bad", [10, -1])
def test_cifar10_mislabelled(tmp_path, bad):
    batches = make_cifar10(tmp_path)
    batches["data_batch_2"][b"labels"][3] = bad
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(batches["data_batch_2"], f)
    with pytest.raises(ValueError, match=rf"data_batch_2 has label {bad} but the dataset has 10 classes"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_missing_batch_and_root(tmp_path):
    make_cifar10(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 not found"):
        load_dataset("cifar10", root=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path / "absent")
    with pytest.raises(ValueError, match=r"needs root"):
        load_dataset("cifar10")


def test_cifar10_bad_contents(tmp_path):
    batches = make_cifar10(tmp_path)
    b = {**batches["data_batch_1"], b"data": np.zeros((4, 100), np.uint8)}
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(b, f)
    with pytest.raises(ValueError, match=r"data_batch_1 has data .*expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path)
    b = {**batches["data_batch_1"], b"labels": [0, 1, 2]}
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(b, f)
    with pytest.raises(ValueError, match=r"4 images but 3 'labels'"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"not a readable CIFAR python pickle"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_cifar100_loads_and_checks_labels(tmp_path):
    batches = make_cifar100(tmp_path / "cifar-100-python")
    s = load_dataset("cifar100", root=tmp_path, val_fraction=0)
    assert s.num_classes == 100 and s.train.classes[7] == "f7"
    assert torch.equal(s.train.labels, torch.tensor(batches["train"][b"fine_labels"]))
    batches["test"][b"fine_labels"][0] = 100
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump(batches["test"], f)
    with pytest.raises(ValueError, match=r"test has label 100 but the dataset has 100 classes"):
        load_dataset("cifar100", root=tmp_path)


# ----------------------------------------------------------------------------- image folders


def test_image_folder_gray(tmp_path):
    written = make_folder(tmp_path)
    s = load_dataset("image-folder", root=tmp_path, val_fraction=0)
    assert s.train.classes == ("ant", "cat")  # sorted folder names
    assert s.in_channels == 1 and s.image_size == (5, 7) and len(s.train) == 4
    assert s.train.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(s.train.images[2, 0], torch.from_numpy(written[("train", "cat", 0)]))
    assert torch.equal(s.test.images[1, 0], torch.from_numpy(written[("test", "ant", 1)]))


def test_image_folder_color_and_gray_mix(tmp_path):
    written = make_folder(tmp_path, color=True)
    gray = np.full((5, 7), 77, np.uint8)
    save_png(tmp_path / "train" / "ant" / "9.png", gray)
    s = load_dataset("image-folder", root=tmp_path, val_fraction=0)
    assert s.in_channels == 3
    assert torch.equal(s.train.images[0].permute(1, 2, 0), torch.from_numpy(written[("train", "ant", 0)]))
    assert torch.equal(s.train.images[2], torch.full((3, 5, 7), 77, dtype=torch.uint8))


def test_image_folder_errors(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*dog is empty"):
        load_dataset("image-folder", root=tmp_path)
    (tmp_path / "train" / "dog" / "x.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):
        load_dataset("image-folder", root=tmp_path)
    (tmp_path / "train" / "dog" / "x.png").unlink()
    save_png(tmp_path / "train" / "dog" / "y.png", np.zeros((6, 7), np.uint8))
    with pytest.raises(ValueError, match=r"y\.png is 7x6 but .* is 7x5; resize"):
        load_dataset("image-folder", root=tmp_path)


def test_image_folder_missing_split(tmp_path):
    make_folder(tmp_path)
    for p in (tmp_path / "test").rglob("*.png"):
        p.unlink()
    for d in sorted((tmp_path / "test").iterdir()):
        d.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test not found: .*root/test/<class>"):
        load_dataset("image-folder", root=tmp_path)


# ----------------------------------------------------------------------------- digits, splits, statistics


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits(digits):
    s = digits
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.test) == 449  # round(0.25 * 1797), fixed
    assert s.num_classes == 10 and s.in_channels == 1 and s.image_size == (8, 8)
    assert int(s.train.images.max()) == 255 and int(s.train.images.min()) == 0
    for part in (s.train, s.val, s.test):
        assert torch.equal(torch.unique(part.labels), torch.arange(10))
    assert s.augment == AugmentSpec(1, False)
    other = load_dataset("digits", split_seed=5)
    assert torch.equal(other.test.images, s.test.images)  # the test split ignores split_seed


def test_digits_read_without_sklearn_equal_load_digits():
    from sklearn.datasets import load_digits

    from ensemble_kd.data.datasets import digits_arrays

    pixels, labels = digits_arrays()
    expected = load_digits()
    assert np.array_equal(pixels, expected.images) and np.array_equal(labels, expected.target)
    code = "import sys; from ensemble_kd.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the demo no longer pays scikit-learn's import


def test_val_split_reproducible_and_stratified(digits):
    s = digits
    n_train_all = len(s.train) + len(s.val)
    assert len(s.val) == round(0.1 * n_train_all)
    again = load_dataset("digits")
    assert torch.equal(again.val.images, s.val.images) and torch.equal(again.train.labels, s.train.labels)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.val.images, s.val.images)
    counts = torch.bincount(s.val.labels, minlength=10)
    assert int(counts.min()) >= 12 and int(counts.max()) <= 15


def test_stratified_split_properties():
    labels = np.repeat(np.arange(5), [30, 20, 7, 2, 1])
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(keep, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
    assert np.all(np.diff(held) > 0) and np.all(np.diff(keep) > 0)
    assert np.bincount(labels[held], minlength=5).tolist() == [6, 4, 1, 1, 0]  # singleton class stays in train
    keep2, held2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(held, held2)
    _, held3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(held, held3)
    assert len(stratified_split(labels, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match=r"fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_mean_std_from_train(digits):
    x = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(float(x.mean()), abs=1e-12)
    assert digits.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-12)
    imgs = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 255.0)]).to(torch.uint8).repeat(1, 3, 1, 1)
    imgs[:, 2] = 7  # a constant channel gets std 1, not a division by zero
    mean, std = channel_stats(imgs)
    assert mean[:2] == pytest.approx((0.5, 0.5)) and std[:2] == pytest.approx((0.5, 0.5)) and std[2] == 1.0


def test_load_dataset_argument_errors(digits):
    assert {"digits", "fashion-mnist", "cifar10", "cifar100", "image-folder"} <= set(list_datasets())
    with pytest.raises(ValueError, match=r"unknown dataset 'mnits'; available: .*digits"):
        load_dataset("mnits")
    with pytest.raises(ValueError, match=r"val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match=r"unknown augment keys \['rotate'\]"):
        load_dataset("digits", augment={"rotate": 3})
    s = load_dataset("digits", val_fraction=0, augment={"crop_padding": 3})
    assert s.augment == AugmentSpec(3, False) and s.val is None
    with pytest.raises(ValueError, match=r"crop_padding"):
        AugmentSpec(crop_padding=-1)


def test_image_dataset_validation():
    imgs = torch.zeros(4, 1, 3, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"uint8"):
        ImageDataset(imgs.float(), torch.zeros(4, dtype=torch.int64), ("a",))
    with pytest.raises(ValueError, match=r"labels range over 0..2 but there are 2 classes"):
        ImageDataset(imgs, torch.tensor([0, 1, 2, 0]), ("a", "b"))
    with pytest.raises(ValueError, match=r"4 images but 3 labels"):
        ImageDataset(imgs, torch.tensor([0, 1, 0]), ("a", "b"))
    four = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 3, 3).clone()
    ds = ImageDataset(four, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    sub = ds.subset([3, 1])
    assert sub.images[:, 0, 0, 0].tolist() == [3, 1] and sub.labels.tolist() == [1, 1] and sub.classes == ("a", "b")
    assert len(sub) == 2 and ds.num_classes == 2 and ds.image_size == (3, 3)


# ----------------------------------------------------------------------------- views

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def imgs():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (64, 3, 9, 11), generator=g, dtype=torch.uint8)


def plain(x_u8):
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_u8.float() / 255 - m) / s


def test_hash_ints():
    idx = torch.arange(10000)
    h = hash_ints(7, 3, idx)
    assert h.dtype == torch.int64 and int(h.min()) >= 0 and int(h.max()) < 2**32
    assert len(torch.unique(h)) > 9990
    assert int(h[1234]) == hash_ints(7, 3, 1234)  # tensor and int paths agree
    assert hash_ints(7, 3, 1234) != hash_ints(7, 4, 1234) != hash_ints(8, 3, 1234)
    assert hash_ints(2**40 + 5, -1) == hash_ints(torch.tensor(2**40 + 5), torch.tensor(-1)).item()
    bits = (h[:, None] >> torch.arange(32)) & 1
    assert torch.all((bits.float().mean(0) - 0.5).abs() < 0.03)  # every bit is fair


def test_view_independent_of_batch(imgs):
    spec = AugmentSpec(2, True)
    kw = dict(epoch=3, seed=11, spec=spec, mean=MEAN, std=STD)
    a = make_view(imgs, torch.tensor([5, 17, 40, 2]), **kw)
    b = make_view(imgs, [40, 9, 5], **kw)
    c = make_view(imgs, torch.arange(64), **kw)
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    assert torch.equal(a, c[[5, 17, 40, 2]])


def test_views_change_with_epoch_and_seed(imgs):
    spec = AugmentSpec(2, True)
    kw = dict(spec=spec, mean=MEAN, std=STD)
    idx = torch.arange(64)
    v0 = make_view(imgs, idx, epoch=0, seed=0, **kw)
    v1 = make_view(imgs, idx, epoch=1, seed=0, **kw)
    w0 = make_view(imgs, idx, epoch=0, seed=1, **kw)
    differ = (v0 != v1).flatten(1).any(1)
    assert int(differ.sum()) > 50  # 1/50 chance per sample of repeating the same crop and flip
    assert int((v0 != w0).flatten(1).any(1).sum()) > 50
    assert torch.equal(v0, make_view(imgs, idx, epoch=0, seed=0, **kw))


def test_eval_view_is_plain_normalisation(imgs):
    idx = torch.tensor([3, 0, 63])
    expected = plain(imgs[idx])
    v = make_view(imgs, idx, epoch=None, seed=0, spec=AugmentSpec(4, True), mean=MEAN, std=STD)
    assert torch.allclose(v, expected, atol=1e-6)
    v = make_view(imgs, idx, epoch=5, seed=0, spec=AugmentSpec(), mean=MEAN, std=STD)
    assert torch.allclose(v, expected, atol=1e-6)
    assert v.dtype == torch.float32 and v.device == imgs.device


def test_view_matches_per_sample_reference(imgs):
    spec = AugmentSpec(3, True)
    idx = torch.arange(64)
    v = make_view(imgs, idx, epoch=2, seed=9, spec=spec, mean=MEAN, std=STD)
    assert v.shape == (64, 3, 9, 11) and v.dtype == torch.float32 and v.device == imgs.device
    dy, dx, flip = view_params(idx, epoch=2, seed=9, spec=spec)
    assert set(dy.tolist()) == set(range(7)) and set(dx.tolist()) == set(range(7))
    assert 10 < int(flip.sum()) < 54
    for i in range(64):  # the reference is a loop on purpose: it is the obvious definition
        padded = F.pad(imgs[i], (3, 3, 3, 3))
        crop = padded[:, dy[i] : dy[i] + 9, dx[i] : dx[i] + 11]
        if flip[i]:
            crop = crop.flip(-1)
        assert torch.equal(v[i], plain(crop[None])[0])


def test_flip_is_a_mirror(imgs):
    idx = torch.arange(64)
    v = make_view(imgs, idx, epoch=0, seed=0, spec=AugmentSpec(0, True), mean=MEAN, std=STD)
    orig, mirror = plain(imgs), plain(imgs.flip(-1))
    is_orig = (v == orig).flatten(1).all(1)
    is_mirror = (v == mirror).flatten(1).all(1)
    assert torch.all(is_orig ^ is_mirror)
    assert 10 < int(is_mirror.sum()) < 54


def test_padding_is_zero_before_normalisation():
    white = torch.full((32, 1, 6, 6), 255, dtype=torch.uint8)
    spec = AugmentSpec(3, False)
    v = make_view(white, torch.arange(32), epoch=1, seed=0, spec=spec, mean=(0.5,), std=(0.5,))
    assert set(torch.unique(v).tolist()) <= {-1.0, 1.0}  # padding 0 -> (0 - .5)/.5 = -1; image 255 -> 1
    dy, dx, _ = view_params(torch.arange(32), epoch=1, seed=0, spec=spec)
    pad_rows, pad_cols = (dy - 3).abs(), (dx - 3).abs()
    expected_pad = 36 - (6 - pad_rows) * (6 - pad_cols)
    assert torch.equal((v == -1).flatten(1).sum(1), expected_pad)
    assert int(expected_pad.sum()) > 0


def test_make_view_argument_errors(imgs):
    with pytest.raises(ValueError, match=r"mean has 1 values but the images have 3 channels"):
        make_view(imgs, [0], epoch=None, seed=0, spec=None, mean=(0.5,), std=STD)
    with pytest.raises(ValueError, match=r"uint8"):
        make_view(imgs.float(), [0], epoch=None, seed=0, spec=None, mean=MEAN, std=STD)


# ----------------------------------------------------------------------------- DeviceLoader


def small_dataset(n: int) -> ImageDataset:
    g = torch.Generator().manual_seed(n)
    return ImageDataset(
        torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8), torch.arange(n) % 3, ("a", "b", "c")
    )


def loader(ds, **kw) -> DeviceLoader:
    kw = {"batch_size": 8, "mean": (0.5,), "std": (0.25,), "spec": AugmentSpec(1, True), **kw}
    return DeviceLoader(ds, **kw)


def all_indices(dl, epoch, **kw):
    return torch.cat([b.index for b in dl.batches(epoch, **kw)])


@pytest.mark.parametrize("train", [True, False])
def test_loader_covers_each_index_once(train):
    ds = small_dataset(41)
    dl = loader(ds, train=train, drop_last=False)
    idx = all_indices(dl, 0)
    assert torch.equal(torch.sort(idx).values, torch.arange(41))
    assert len(dl) == 6 and sum(1 for _ in dl.batches(0)) == 6
    if not train:
        assert torch.equal(idx, torch.arange(41))  # eval is sequential


def test_loader_order_seeded():
    ds = small_dataset(41)
    dl = loader(ds, drop_last=False, seed=4)
    assert torch.equal(all_indices(dl, 1), all_indices(loader(ds, drop_last=False, seed=4), 1))
    assert not torch.equal(all_indices(dl, 1), all_indices(dl, 2))
    assert not torch.equal(all_indices(dl, 1), all_indices(loader(ds, drop_last=False, seed=5), 1))


def test_loader_batches_are_the_views():
    ds = small_dataset(41)
    dl = loader(ds, seed=3)
    for b in dl.batches(7):
        assert b.x.dtype == torch.float32 and b.y.dtype == torch.int64 and b.index.dtype == torch.int64
        assert torch.equal(b.y, ds.labels[b.index])
        expected = make_view(ds.images, b.index, epoch=7, seed=3, spec=AugmentSpec(1, True), mean=(0.5,), std=(0.25,))
        assert torch.equal(b.x, expected)
    ev = loader(ds, train=False)
    b = next(iter(ev.batches(None)))
    assert torch.allclose(b.x, (ds.images[:8].float() / 255 - 0.5) / 0.25)


def test_loader_drop_last():
    ds = small_dataset(41)
    dl = loader(ds)  # train: drop_last defaults to True
    sizes = [len(b.index) for b in dl.batches(0)]
    assert len(dl) == 5 and sizes == [8] * 5
    sizes = [len(b.index) for b in loader(ds, drop_last=False).batches(0)]
    assert sizes == [8] * 5 + [1]
    assert len(loader(ds, train=False)) == 6


def test_loader_shards():
    ds = small_dataset(40)
    shards = [all_indices(loader(ds, drop_last=False, rank=r, world_size=4), 3) for r in range(4)]
    assert all(len(s) == 10 for s in shards)
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(40))  # disjoint and covering
    ds = small_dataset(41)  # padded to 44: every sample seen, three twice
    shards = [all_indices(loader(ds, drop_last=False, rank=r, world_size=4), 3) for r in range(4)]
    assert all(len(s) == 11 for s in shards)
    assert torch.equal(torch.unique(torch.cat(shards)), torch.arange(41))
    ev = [all_indices(loader(ds, train=False, rank=r, world_size=4), None) for r in range(4)]
    assert torch.equal(torch.sort(torch.cat(ev)).values, torch.arange(41))  # eval: no padding, no repeats
    with pytest.raises(ValueError, match=r"rank must be in 0..world_size-1"):
        loader(ds, rank=4, world_size=4)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_loader_start_skips_batches(k):
    dl = loader(small_dataset(41), drop_last=False, seed=2)
    full = list(dl.batches(4))
    part = list(dl.batches(4, start=k))
    assert len(part) == len(full) - k
    for a, b in zip(full[k:], part):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_loader_argument_errors():
    ds = small_dataset(10)
    with pytest.raises(ValueError, match=r"start must be an integer in 0..2"):
        list(loader(ds, drop_last=False).batches(0, start=3))
    with pytest.raises(ValueError, match=r"needs an integer epoch"):
        list(loader(ds).batches(None))
    with pytest.raises(ValueError, match=r"batch_size"):
        loader(ds, batch_size=0)
    with pytest.raises(ValueError, match=r"mean and std need 1 values"):
        loader(ds, mean=(0.5, 0.5, 0.5))


def test_view_epoch_separates_views_from_order():
    from ensemble_kd.data import AugmentSpec, DeviceLoader, load_dataset, make_view

    splits = load_dataset("digits", val_fraction=0.0)
    loader = DeviceLoader(splits.train, batch_size=64, mean=splits.mean, std=splits.std,
                          spec=AugmentSpec(crop_padding=2, flip=True), seed=5)
    batch = next(loader.batches(3, view_epoch=0))
    assert torch.equal(batch.index, next(loader.batches(3)).index)  # order of epoch 3
    views0 = make_view(loader.images, batch.index, epoch=0, seed=5, spec=loader.spec,
                       mean=loader.mean, std=loader.std)
    assert torch.equal(batch.x, views0)  # pixels of epoch 0
    assert not torch.equal(batch.x, next(loader.batches(3)).x)
