"""YouTube-8M frame-level TFRecords, written with the tfrecord package's writer (_tfrecords.py): round trip,
dequantization, streaming batches, DBoF training on them, and the sentences for broken files."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data.youtube8m import TFRecordFile, YouTube8M, YouTube8MLoader, dequantize, masked_crc32c
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.ensemble.cache import CacheMismatchError, build_cache, open_cache
from ensemble_kd.methods import Needs
from ensemble_kd.models import create
from ensemble_kd.models.video import frame_mask

sys.path.insert(0, str(Path(__file__).parent))
from _tfrecords import CLASSES, make_videos, write_tfrecord  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("yt8m")
    videos = {"train0000": make_videos(30, 0), "train0001": make_videos(26, 1), "validate0000": make_videos(20, 2)}
    for name, items in videos.items():
        write_tfrecord(root / f"{name}.tfrecord", items)
    (root / "README.txt").write_text("not a record file")  # ignored: only *.tfrecord are listed
    return root, videos


def test_dequantize_hand_case():
    # scalar = 4/255, bias = 2/255 - 2: q -> (4q + 2)/255 - 2
    got = dequantize(np.array([0, 128, 255], dtype=np.uint8))
    np.testing.assert_allclose(got, [2 / 255 - 2, 514 / 255 - 2, 1022 / 255 - 2], rtol=0, atol=1e-6)
    assert got.dtype == np.float32 and abs(got[0] + 1.992157) < 1e-6
    torch.testing.assert_close(dequantize(torch.tensor([0, 128, 255], dtype=torch.uint8)), torch.from_numpy(got))


def test_round_trip_of_frames_and_labels_with_a_frame_cap(root):
    root, videos = root
    paths = [root / "train0000.tfrecord", root / "train0001.tfrecord"]
    every = videos["train0000"] + videos["train0001"]
    for cap in (300, 5):
        ds = YouTube8M(paths, num_classes=CLASSES, max_frames=cap)
        assert len(ds) == 56 and ds.feature_dim == 1152
        for i in (0, 29, 30, 55):  # both files, their first and last records
            frames, hot = ds.item(i)
            _, want, labels = every[i]
            assert frames.dtype == np.uint8 and np.array_equal(frames, want[:cap])
            assert np.array_equal(np.nonzero(hot)[0], labels) and hot.dtype == np.float32
    sub = ds.subset([55, 3])
    assert np.array_equal(sub.item(0)[0], every[55][1][:5]) and len(sub) == 2
    file = TFRecordFile(paths[1])
    assert len(file) == 26 and file.offsets[0] == 12  # the offset index from the framing


def test_streamed_batches_are_the_dequantized_frames_zero_padded(root):
    root, videos = root
    ds = YouTube8M([root / "validate0000.tfrecord"], num_classes=CLASSES)
    batches = {}
    for workers in (0, 1):
        loader = YouTube8MLoader(ds, batch_size=8, train=True, seed=3, workers=workers)
        batches[workers] = list(loader.batches(0))
    assert len(batches[0]) == 2  # 20 // 8, drop_last
    for a, b in zip(batches[0], batches[1]):  # the workers change nothing
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
    for batch in batches[0]:
        lengths = torch.tensor([len(videos["validate0000"][i][1]) for i in batch.index])
        assert batch.x.shape == (8, int(lengths.max()), 1152) and batch.y.shape == (8, CLASSES)
        assert torch.equal(frame_mask(batch.x).sum(1), lengths)  # the models' padding rule finds the frames
        for row, i in enumerate(batch.index.tolist()):
            want = dequantize(videos["validate0000"][i][1])
            torch.testing.assert_close(batch.x[row, :len(want)], torch.from_numpy(want))
    evaluate = YouTube8MLoader(ds, batch_size=8, train=False)
    assert torch.equal(torch.cat([b.index for b in evaluate.batches(None)]), torch.arange(20))


def test_streamed_training_batches_draw_frames_per_video(root):
    from ensemble_kd.data.frames import frame_positions

    root, videos = root
    ds = YouTube8M([root / "validate0000.tfrecord"], num_classes=CLASSES)
    loader = YouTube8MLoader(ds, batch_size=8, train=True, seed=3, frames_per_video=6)
    for batch in loader.batches(2):
        assert batch.x.shape == (8, 6, 1152)
        lengths = torch.tensor([len(videos["validate0000"][i][1]) for i in batch.index])
        positions = frame_positions(lengths, batch.index, epoch=2, seed=3, count=6)
        for row, i in enumerate(batch.index.tolist()):
            want = torch.from_numpy(dequantize(videos["validate0000"][i][1]))[positions[row]]
            torch.testing.assert_close(batch.x[row], want)
    assert loader.views_fingerprint() == {"frames_per_video": 6}
    evaluate = YouTube8MLoader(ds, batch_size=8, train=False, frames_per_video=6)
    assert next(iter(evaluate.batches(None))).x.shape[1] > 6  # evaluation: every frame


def test_dbof_trains_a_step_on_youtube8m_through_the_pipeline(root, tmp_path):
    root, _ = root
    config = load_config(None, ["device=cpu", "data.name=youtube8m", f"data.root={root}", f"data.num_classes={CLASSES}",
                                "data.max_frames=10", "data.batch_size=16", "student.arch=dbof",
                                "student.kwargs={cluster_size: 16, hidden_size: 8}", "student.train.epochs=1",
                                "student.train.optim={name: adamw, lr: 0.01}", "eval.latency=false"])
    data = pipeline.prepare_data(config)
    assert (len(data.splits.train), len(data.splits.val), len(data.splits.test)) == (50, 6, 20)
    assert data.splits.num_classes == CLASSES and data.splits.in_channels == 1152
    model = create("dbof", num_classes=CLASSES, in_channels=1152, cluster_size=16, hidden_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(iter(data.train_loader(config.data, 0).batches(0)))
    assert batch.x.shape[1] <= 10  # the frame cap
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch.x), batch.y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss) and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    student, info = pipeline.distill(config, tmp_path / "run", data=data)  # ce: the whole command's path
    assert info["steps"] == 50 // 16
    row = pipeline.evaluate_student(config, student, data)[0]
    assert 0 <= row["map"] <= 1 and 0 <= row["gap"] <= 1


def _frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def test_broken_files_get_one_sentence_naming_the_file(root, tmp_path):
    root, videos = root
    good = (root / "train0001.tfrecord").read_bytes()
    file = TFRecordFile(root / "train0001.tfrecord")
    corrupt = bytearray(good)
    corrupt[int(file.offsets[1]) + 40] ^= 0xFF  # one byte inside record 1's data
    (tmp_path / "corrupt.tfrecord").write_bytes(bytes(corrupt))
    ds = YouTube8M([tmp_path / "corrupt.tfrecord"], num_classes=CLASSES)
    ds.item(0)  # the other records still read
    with pytest.raises(ValueError, match=r"^record 1 of '.*corrupt.tfrecord' is corrupt \(its checksum does not "
                                         r"match its data\); download the file again or remove it$"):
        ds.item(1)
    with pytest.raises(ValueError, match="record 1 of .*corrupt.tfrecord' is corrupt"):  # from a loader too
        list(YouTube8MLoader(ds, batch_size=4, train=False).batches(None))
    (tmp_path / "cut.tfrecord").write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"'.*cut.tfrecord' is truncated: record 25 starts at byte \d+"):
        TFRecordFile(tmp_path / "cut.tfrecord")
    (tmp_path / "text.tfrecord").write_bytes(b"this is not a tfrecord file at all")
    with pytest.raises(ValueError, match="record 0 of '.*text.tfrecord' .* has a corrupt length field"):
        TFRecordFile(tmp_path / "text.tfrecord")
    (tmp_path / "other.tfrecord").write_bytes(_frame(b"\xff\xff\xff"))  # well framed, not a SequenceExample
    with pytest.raises(ValueError, match="record 0 of '.*other.tfrecord' is not a tf.train.SequenceExample"):
        YouTube8M([tmp_path / "other.tfrecord"], num_classes=CLASSES).item(0)
    with pytest.raises(ValueError, match="has label [4-7], outside 0..3; set data.num_classes"):
        YouTube8M([root / "validate0000.tfrecord"], num_classes=4).subset(
            [i for i, v in enumerate(videos["validate0000"]) if v[2].max() >= 4][:1]).item(0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs train.*tfrecord and validate.*found 0 and 0"):
        pipeline.prepare_data(load_config(None, ["device=cpu", "data.name=youtube8m", f"data.root={tmp_path / 'empty'}"]))


def test_a_teacher_cache_of_streamed_videos_serves_the_online_logits(root, tmp_path):
    root, _ = root
    ds = YouTube8M([root / "train0000.tfrecord"], num_classes=CLASSES)
    torch.manual_seed(0)
    teachers = TeacherSet([create("dbof", num_classes=CLASSES, in_channels=1152, cluster_size=16, hidden_size=8)])
    loader = YouTube8MLoader(ds, batch_size=8, seed=1)
    cached = open_cache(build_cache(teachers, loader, tmp_path, epochs=1, dtype="float32", shard_size=16),
                        teachers, loader)
    for batch in loader.batches(3):  # epoch 3 wraps onto the one cached epoch: videos have no views
        got = cached.outputs(batch.x, Needs(teacher_logits=True), index=batch.index, epoch=3).logits
        torch.testing.assert_close(got, teachers.member_logits(batch.x), rtol=1e-5, atol=1e-5)
    other = YouTube8MLoader(YouTube8M([root / "train0001.tfrecord"], num_classes=CLASSES), batch_size=8, seed=1)
    with pytest.raises(CacheMismatchError, match="training samples of shape"):
        open_cache(tmp_path, teachers, other)
