"""Streamed image data: folders of any image size and mode, tar shards, seeded views replayed by any
number of workers, resume without decoding, bad files named, memory that does not grow with the data."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data import ImageDataset
from ensemble_kd.data.samples import DecodeError, ImageFiles, TarSamples
from ensemble_kd.data.stream import StreamLoader

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder, make_tar_shards  # noqa: E402

SMALL = ["device=cpu", "data.views.size=16", "data.batch_size=6", "data.workers=0", "data.val_fraction=0"]


def _config(root, *extra, name="image-folder"):
    return load_config(None, [*SMALL, f"data.name={name}", f"data.root={root}", *extra])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"))


def _epoch(loader, epoch=0, start=0):
    batches = list(loader.batches(epoch, start=start))
    return torch.cat([b.index for b in batches]), torch.cat([b.x for b in batches]), batches


def test_a_folder_of_varied_sizes_and_modes_streams_as_rgb(folder):
    data = pipeline.prepare_data(_config(folder, "data.val_fraction=0.2"))
    s = data.splits
    assert isinstance(s.train, ImageFiles) and s.train.classes == ("ant", "bee", "cat")
    assert (s.num_classes, s.in_channels, s.image_size) == (3, 3, (16, 16))
    assert len(s.train) + len(s.val) == 24 and len(s.test) == 9
    assert len(s.mean) == 3 and all(0 < v < 1 for v in s.mean + s.std)
    index, x, batches = _epoch(data.train_loader(data.config.data, seed=0))
    assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
    assert len(batches) == len(s.train) // 6 and len(set(index.tolist())) == len(index)
    test = torch.cat([b.x for b in data.test.batches(0)])
    assert test.shape == (9, 3, 16, 16)
    assert torch.equal(torch.cat([b.y for b in data.test.batches(0)]), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))


def test_auto_storage_keeps_small_one_size_folders_in_memory(tmp_path, folder):
    same = make_image_folder(tmp_path / "same", sizes=(12, 12), modes=("RGB",))
    assert isinstance(pipeline.prepare_data(_config(same)).splits.train, ImageDataset)
    assert isinstance(pipeline.prepare_data(_config(same, "data.views.train=rrc")).splits.train, ImageFiles)
    assert isinstance(pipeline.prepare_data(_config(same, "data.storage=stream")).splits.train, ImageFiles)
    with pytest.raises(ValueError, match=r"is \d+x\d+ but .*; resize"):  # varied sizes cannot be held in memory
        pipeline.prepare_data(_config(folder, "data.storage=memory"))
    with pytest.raises(ValueError, match=r"views.train=rrc .* needs data.storage stream"):
        pipeline.prepare_data(_config(same, "data.storage=memory", "data.views.train=rrc"))
    with pytest.raises(ValueError, match=r"data.storage=stream needs images read from files"):
        pipeline.prepare_data(load_config(None, ["device=cpu", "data.storage=stream"]))


def test_given_mean_and_std_are_used(folder):
    s = pipeline.prepare_data(_config(folder, "data.mean=[0.5, 0.4, 0.3]", "data.std=[0.2, 0.2, 0.2]")).splits
    assert s.mean == (0.5, 0.4, 0.3) and s.std == (0.2, 0.2, 0.2)
    with pytest.raises(ValueError, match="data.mean has 2 values but the images have 3 channels"):
        pipeline.prepare_data(_config(folder, "data.mean=[0.5, 0.4]"))


VIEWS = ["data.views.mixup_alpha=0.4", "data.views.cutmix_alpha=1.0", "data.views.mix_prob=0.7"]


def _views_file(root, workers, out):
    """The first epoch-1 batches' pixels and targets, as the training loader makes them."""
    data = pipeline.prepare_data(_config(root, f"data.workers={workers}", *VIEWS))
    loader = data.train_loader(data.config.data, seed=5)
    batches = list(loader.batches(1))
    torch.save({"x": torch.cat([b.x for b in batches]), "index": torch.cat([b.index for b in batches]),
                "target": torch.cat([b.target for b in batches])}, out)


def test_views_are_the_same_with_0_1_2_workers_and_in_a_fresh_process(folder, tmp_path):
    for workers in (0, 1, 2):
        _views_file(folder, workers, tmp_path / f"w{workers}.pt")
    code = (f"import sys; sys.path[:0] = {sys.path!r}; import test_stream as t; "
            f"t._views_file({str(folder)!r}, 2, {str(tmp_path / 'fresh.pt')!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parent, timeout=300)
    ref = torch.load(tmp_path / "w0.pt")
    assert not torch.equal(ref["target"].max(1).values, torch.ones(len(ref["target"])))  # some samples mixed
    for name in ("w1.pt", "w2.pt", "fresh.pt"):
        got = torch.load(tmp_path / name)
        for key in ("x", "index", "target"):
            assert torch.equal(got[key], ref[key]), (name, key)


def test_a_view_depends_on_seed_epoch_and_index_only(folder):
    data = pipeline.prepare_data(_config(folder))
    loader = data.train_loader(data.config.data, seed=2)
    index, x, _ = _epoch(loader, epoch=3)
    again = next(iter(loader.batches_at([index.flip(0)[:4]], 3)))  # another batch, another order
    assert torch.equal(again.x, x.flip(0)[:4])
    other = next(iter(loader.batches_at([index[:4]], 4)))
    assert not torch.equal(other.x, x[:4])


def test_resume_mid_epoch_skips_batches_without_reading_them(folder, monkeypatch):
    data = pipeline.prepare_data(_config(folder))
    loader = data.train_loader(data.config.data, seed=0)
    _, full, _ = _epoch(loader)
    reads = []
    original = ImageFiles.read
    monkeypatch.setattr(ImageFiles, "read", lambda self, i: reads.append(i) or original(self, i))
    _, tail, _ = _epoch(loader, start=2)
    assert torch.equal(tail, full[2 * 6:])
    assert len(reads) == len(tail)  # the two skipped batches were never read


def test_ranks_read_disjoint_parts_of_every_epoch(folder):
    data = pipeline.prepare_data(_config(folder))
    parts = [torch.cat([b.index for b in data.train_loader(data.config.data, 0, rank, 2).batches(1)]) for rank in (0, 1)]
    assert not set(parts[0].tolist()) & set(parts[1].tolist())


# ----------------------------------------------------------------------------- tar shards

def test_tar_shards_stream_by_index(tmp_path):
    root = make_tar_shards(tmp_path / "shards", num_classes=3, per_shard=10, shards=2)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    data = pipeline.prepare_data(_config(root, name="tar-shards"))
    s = data.splits
    assert isinstance(s.train, TarSamples) and s.train.classes == ("red", "green", "blue")
    assert len(s.train) == 20 and s.train.labels.tolist() == [i % 3 for i in range(20)]
    loader = data.train_loader(data.config.data, seed=0)
    index, x, _ = _epoch(loader)
    backwards = next(iter(loader.batches_at([index.flip(0)[:5]], 0)))
    assert torch.equal(backwards.x, x.flip(0)[:5])  # random access: any index, any order
    with tarfile.open(root / "train" / "000001.tar") as tar:
        member = tar.getmember("train01_0003.png")
        assert s.train.read(13) == tar.extractfile(member).read()


def test_tar_shard_problems_are_named(tmp_path):
    root = make_tar_shards(tmp_path / "nolabels", labels=False, shards=1)
    with pytest.raises(ValueError, match=r"train00_0000\.jpg in tar shard .*000000\.tar has no label: add "
                                         r"train00_0000\.cls"):
        pipeline.prepare_data(_config(root, name="tar-shards"))
    root = make_tar_shards(tmp_path / "extra", num_classes=2, shards=1)
    with tarfile.open(root / "test" / "000000.tar", "a") as tar:
        info = tarfile.TarInfo("late.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"7"))
        src = (root / "train" / "000000.tar")
        with tarfile.open(src) as t:
            data = t.extractfile("train00_0000.jpg").read()
        info = tarfile.TarInfo("late.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"late\.jpg in .*test has class 7, which the training shards lack"):
        pipeline.prepare_data(_config(root, name="tar-shards"))


def _append(shard: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(shard, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _member(shard: Path, name: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(name).read()


def test_a_label_without_its_image_and_a_key_twice_are_named_before_training(tmp_path):
    root = make_tar_shards(tmp_path / "orphan", shards=1)
    _append(root / "train" / "000000.tar", {"lost.cls": b"1", "lost.txt": b"a caption"})
    with pytest.raises(ValueError, match=r"lost\.cls in tar shard .*train/000000\.tar has no image beside it "
                                         r"\(its other member lost\.txt is not an image"):
        pipeline.prepare_data(_config(root, name="tar-shards"))
    for name, extra in {"same": {"train00_0003.png": None}, "other ext": {"train00_0003.jpg": None},
                        "label": {"train00_0003.cls": b"2"}}.items():
        root = make_tar_shards(tmp_path / name.replace(" ", "-"), shards=1)
        shard = root / "train" / "000000.tar"
        image = _member(shard, "train00_0001.png")  # a healthy image under the repeated key
        _append(shard, {k: v if v is not None else image for k, v in extra.items()})
        first = "train00_0003.cls" if name == "label" else "train00_0003.png"
        with pytest.raises(ValueError, match=rf"000000\.tar holds sample 'train00_0003' twice \({first} and "
                                             rf"{next(iter(extra))}\)"):
            pipeline.prepare_data(_config(root, name="tar-shards"))


def test_labels_with_gaps_need_classes_txt(tmp_path):
    root = make_tar_shards(tmp_path / "sparse", num_classes=3, shards=1)
    _append(root / "train" / "000000.tar", {"rare.cls": b"99", "rare.png": _member(root / "train" / "000000.tar",
                                                                                   "train00_0001.png")})
    with pytest.raises(ValueError, match=r"labels up to 99 but no sample of 96 of those 100 classes \(3, 4, 5, 6, "
                                         r"7, \.\.\.\); number the classes 0\.\.K-1 without gaps, or list every "
                                         r"class in .*classes\.txt"):
        pipeline.prepare_data(_config(root, name="tar-shards"))
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(100)))  # declared: empty classes are meant
    assert pipeline.prepare_data(_config(root, name="tar-shards")).splits.train.num_classes == 100


def _flip_byte(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("keep", ["in a header", "in an image", "in a label", "at a header"])
def test_a_truncated_shard_is_called_truncated(tmp_path, keep):
    root = make_tar_shards(tmp_path / "cut", shards=1, per_shard=4)
    shard = root / "train" / "000000.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar}
    member = members["train00_0001.png" if keep != "in a label" else "train00_0001.cls"]
    cut = {"in a header": member.offset + 100, "in an image": member.offset_data + member.size // 2,
           "in a label": member.offset_data, "at a header": member.offset}[keep]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:cut])
    with pytest.raises(ValueError, match=rf"tar shard .*000000\.tar is truncated: .* the file ends at byte {cut}; "
                                         r"copy or download it again"):
        pipeline.prepare_data(_config(root, name="tar-shards"))
    shard.write_bytes(_flip_byte(whole, member.offset + 100))  # a damaged header ended tarfile's walk quietly
    with pytest.raises(ValueError, match=rf"000000\.tar has a damaged member header at byte {member.offset} "):
        pipeline.prepare_data(_config(root, name="tar-shards"))
    (root / "train" / "000001.tar").write_bytes(b"\x1f\x8b" + bytes(600))  # compressed, not cut: still said so
    shard.unlink()
    with pytest.raises(ValueError, match=r"000001\.tar is not an uncompressed tar file"):
        pipeline.prepare_data(_config(root, name="tar-shards"))


# ----------------------------------------------------------------------------- bad input

def test_a_corrupt_file_in_the_middle_of_a_folder_is_named_before_training(tmp_path):
    root = make_image_folder(tmp_path / "f")
    (root / "train" / "bee" / "0003.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"cannot read image .*bee/0003\.png .*remove or replace the file"):
        pipeline.prepare_data(_config(root))


def test_folder_problems_are_named(tmp_path):
    root = make_image_folder(tmp_path / "f", per_class=2, test_per_class=1)
    (root / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*train/dog is empty"):
        pipeline.prepare_data(_config(root, "data.storage=stream"))
    (root / "train" / "dog").rmdir()
    (root / "test" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"test has class folders \['emu'\] that .*train lacks"):
        pipeline.prepare_data(_config(root, "data.storage=stream"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not


def test_a_file_that_breaks_mid_epoch_stops_naming_it_or_is_skipped_and_counted(tmp_path, capsys):
    root = make_image_folder(tmp_path / "f", modes=("RGB",), sizes=(80, 120))
    _truncate(root / "train" / "bee" / "0002.jpg")
    given = ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"]  # no estimate: nothing decoded at load
    data = pipeline.prepare_data(_config(root, "data.workers=1", *given))
    with pytest.raises(DecodeError, match=r"cannot decode image .*bee/0002\.jpg .*data\.on_decode_error=skip"):
        _epoch(data.train_loader(data.config.data, seed=0))
    config = _config(root, "data.workers=1", "data.on_decode_error=skip", *given)
    loader = pipeline.prepare_data(config).train_loader(config.data, seed=0)
    index, x, batches = _epoch(loader)
    assert len(index) == 24 and len(loader.skipped) == 1 and "bee/0002.jpg" in loader.skipped[0]  # train: bee/0002 is index 10
    assert "1 image(s) could not be decoded" in capsys.readouterr().err
    k = index.tolist().index(10)  # the sample is replaced by the next index's image, deterministically
    nxt = next(iter(loader.batches_at([torch.tensor([11])], 0)))
    assert torch.equal(x[k], nxt.x[0]) and int(torch.cat([b.y for b in batches])[k]) == int(nxt.y[0])


# ----------------------------------------------------------------------------- memory

def _rss_of_a_pass(root, out):
    """Peak RSS (kB) of this process and of its loader workers after one epoch over `root`."""
    import resource

    config = load_config(None, ["device=cpu", "data.name=image-folder", f"data.root={root}", "data.views.size=32",
                                "data.batch_size=32", "data.workers=2", "data.val_fraction=0", "data.storage=stream",
                                "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"])
    data = pipeline.prepare_data(config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in data.train_loader(config.data, seed=0).batches(0):
        pass
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    Path(out).write_text(f"{before} {self_peak} {workers}")


def _copies(root: Path, count: int, sources: list[bytes]) -> Path:
    for i in range(count):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(sources[i % len(sources)])
    for c in range(2):
        (root / "test" / f"c{c}").mkdir(parents=True, exist_ok=True)
        (root / "test" / f"c{c}" / "0.jpg").write_bytes(sources[c])
    return root


def test_memory_of_a_pass_does_not_grow_with_the_number_of_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    sources = []
    for k in range(8):  # 240x240 photos-like JPEGs: 170 kB each once decoded
        buf = io.BytesIO()
        smooth = np.kron(rng.integers(0, 256, (15, 15, 3)), np.ones((16, 16, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(buf, format="JPEG")
        sources.append(buf.getvalue())
    small, large = _copies(tmp_path / "small", 100, sources), _copies(tmp_path / "large", 1500, sources)
    peaks = {}
    for name, root in (("small", small), ("large", large)):
        code = (f"import sys; sys.path[:0] = {sys.path!r}; import test_stream as t; "
                f"t._rss_of_a_pass({str(root)!r}, {str(tmp_path / (name + '.txt'))!r})")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parent, timeout=600)
        peaks[name] = [int(v) for v in (tmp_path / f"{name}.txt").read_text().split()]
    # Holding 1400 more decoded images would take 240 MB; the pass may grow by a few MB (listing, queues).
    grown_main = peaks["large"][1] - peaks["small"][1]
    grown_workers = peaks["large"][2] - peaks["small"][2]
    assert grown_main < 40_000 and grown_workers < 40_000, peaks


def test_streamed_test_data_gets_corruption_and_ood_rows(folder, tmp_path):
    """Robustness at ImageNet scale: the eval views of the first test images, read once, are what
    the corruptions and the OOD comparison use; the OOD set is another folder through the same views."""
    from ensemble_kd.evaluation.robustness import robustness_fields

    data = pipeline.prepare_data(_config(folder, "data.storage=stream", "data.views.train=none"))
    test = data.test
    views, labels = test.eval_views(5)
    streamed = torch.cat([b.x for b in test.batches(0)])[:5]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (test.mean, test.std))
    assert views.dtype == torch.uint8 and views.shape == (5, 3, 16, 16)
    torch.testing.assert_close((views.float() / 255 - mean) / std, streamed)  # the very inputs the model sees
    assert torch.equal(labels, test.labels[:5])
    other = make_image_folder(tmp_path / "other", classes=("x", "y"), seed=5)
    eval_cfg = load_config(None, ["eval.corruptions=true", "eval.ood=image-folder", f"eval.ood_root={other}",
                                  "eval.corruption_samples=6"]).eval
    seen = []

    def log_probs(x):
        seen.append(x.shape)
        return torch.log_softmax(x.mean((2, 3)), dim=1)  # a 3-class "model": the channel means

    fields = robustness_fields(log_probs, test, eval_cfg)
    assert {"corr_acc", "corr_nll", "corr_ece", "ood_auroc_maxprob"} <= set(fields)
    assert all(s[1:] == (3, 16, 16) for s in seen)
    assert 0.0 <= fields["ood_auroc_maxprob"] <= 1.0 and 0.0 <= fields["corr_acc"] <= 1.0
