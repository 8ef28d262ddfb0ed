"""YouTube-8M frame-level TFRecords, read without TensorFlow, streamed by index.

A record is a tf.train.SequenceExample: context `id` (bytes) and `labels` (int64 list), feature
lists `rgb` (1024 uint8 bytes per frame) and `audio` (128 per frame). The protobuf classes are
those the `tfrecord` package ships (tensorflow.SequenceExample); the framing (u64 length,
masked crc32c of it, the data, masked crc32c of the data) is read here, so that every file gets
an offset index when it is opened (any record is then one seek away: random access keeps the
training order seeded) and every checksum is verified, a corrupt record named with its file (the
length checksums as the index is built, each record's data checksum as it is read). The index is
built by scanning the framing once per file and kept in the index cache (index_cache.py): later
openings of the unchanged file (same size and mtime), in any process, read it from there.

Frames are dequantized as YouTube-8M's starter code does (`Dequantize(feat, max_quantized_value=2,
min_quantized_value=-2)`: feat * (max - min) / 255 + (max - min) / 510 + min), rgb then audio,
1152 features a frame, the first `max_frames` of each video. A dequantized frame is never all
zero, so zero padding after the last frame marks padding for the models (as in video-npz).

Workers send the quantized bytes (a quarter of the floats' size); the loader dequantizes on the
device.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence

import crc32c
import numpy as np
import torch
from google.protobuf.message import DecodeError
from tfrecord import example_pb2

from .frames import SampledFrames, check_frames_per_video
from .index_cache import cached_index
from .loader import Batch, ShardedLoader, worker_options

__all__ = ["FEATURE_DIM", "TFRecordFile", "YouTube8M", "YouTube8MLoader", "dequantize", "list_splits",
           "masked_crc32c", "parse_video"]

RGB_DIM, AUDIO_DIM = 1024, 128
FEATURE_DIM = RGB_DIM + AUDIO_DIM
_MASK = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: crc32c rotated right by 15 bits plus a constant, mod 2**32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK) & 0xFFFFFFFF


def dequantize(feat, max_quantized_value: float = 2.0, min_quantized_value: float = -2.0):
    """uint8 -> float32 as YouTube-8M's starter code: feat * scalar + bias, scalar = (max - min) / 255,
    bias = scalar / 2 + min. Works on numpy arrays and torch tensors."""
    scalar = (max_quantized_value - min_quantized_value) / 255.0
    bias = scalar / 2.0 + min_quantized_value
    if isinstance(feat, torch.Tensor):
        return feat.float() * scalar + bias
    return np.asarray(feat, dtype=np.float32) * np.float32(scalar) + np.float32(bias)


def _framing_holds(index: dict[str, np.ndarray], file_size: int) -> bool:
    """Whether a stored index is the framing of a file of this size: records end to end from byte 0,
    each 12 header bytes, its data and a 4-byte checksum, the last one ending with the file."""
    offsets, lengths = index["offsets"], index["lengths"]
    if len(offsets) != len(lengths) or bool(np.any(lengths < 0)):
        return False
    starts = np.concatenate([[0], (offsets + lengths + 4)[:-1]]) + 12
    end = int(offsets[-1] + lengths[-1] + 4) if len(offsets) else 0
    return bool(np.array_equal(offsets, starts[:len(offsets)])) and end == file_size


class TFRecordFile:
    """The records of one TFRecord file: their offsets, from the framing, and each one by number."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = cached_index(self.path, "tfrecord", self._scan, {"offsets": np.int64, "lengths": np.int64},
                             _framing_holds)
        self.offsets, self.lengths = index["offsets"], index["lengths"]
        self._handle = None
        self._pid = None

    def _scan(self) -> dict[str, np.ndarray]:
        """Every record's data offset and length, from the framing; the length checksums verified."""
        offsets, lengths = [], []
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            position = 0
            while position < size:
                header = f.read(12)
                if len(header) < 12:
                    raise ValueError(self._truncated(len(offsets), position, size))
                (length,) = struct.unpack("<Q", header[:8])
                if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                    raise ValueError(f"record {len(offsets)} of '{self.path}' (byte {position}) has a corrupt length "
                                     f"field: it is not a TFRecord file or is damaged; replace or remove it")
                if position + 12 + length + 4 > size:
                    raise ValueError(self._truncated(len(offsets), position, size))
                offsets.append(position + 12)
                lengths.append(length)
                position += 12 + length + 4
                f.seek(position)
        return {"offsets": np.asarray(offsets, dtype=np.int64), "lengths": np.asarray(lengths, dtype=np.int64)}

    def _truncated(self, record: int, position: int, size: int) -> str:
        return (f"'{self.path}' is truncated: record {record} starts at byte {position} and the file ends at "
                f"byte {size}; download it again or remove it")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):  # an open file does not travel to loader workers: each opens its own
        return {**self.__dict__, "_handle": None, "_pid": None}

    def read(self, i: int) -> bytes:
        """Record i's bytes, its checksum verified."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        offset, length = int(self.offsets[i]), int(self.lengths[i])
        self._handle.seek(offset)
        data = self._handle.read(length + 4)
        if len(data) != length + 4 or masked_crc32c(data[:length]) != struct.unpack("<I", data[length:])[0]:
            raise ValueError(f"record {i} of '{self.path}' is corrupt (its checksum does not match its data); "
                             f"download the file again or remove it")
        return data[:length]


def parse_video(record: bytes, *, num_classes: int, max_frames: int, where: str = "a record"
                ) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(video id, quantized frames uint8 (T, 1152) with T <= max_frames, labels int64) of one
    SequenceExample; a ValueError names `where` for anything that is not YouTube-8M's layout."""
    seq = example_pb2.SequenceExample()
    try:
        seq.ParseFromString(record)
    except DecodeError:
        raise ValueError(f"{where} is not a tf.train.SequenceExample; is it a YouTube-8M frame-level file?") from None
    lists = seq.feature_lists.feature_list
    if "rgb" not in lists or "audio" not in lists:
        raise ValueError(f"{where} has no 'rgb' and 'audio' frame features: YouTube-8M frame-level records "
                         f"have both (the video-level files are not read)")
    rgb, audio = lists["rgb"].feature, lists["audio"].feature
    if len(rgb) != len(audio) or not len(rgb):
        raise ValueError(f"{where} has {len(rgb)} rgb and {len(audio)} audio frames; each video needs the "
                         f"same number, at least one")
    t = min(len(rgb), max_frames)
    try:
        frames = np.concatenate(
            [np.frombuffer(b"".join(f.bytes_list.value[0] for f in rgb[:t]), np.uint8).reshape(t, RGB_DIM),
             np.frombuffer(b"".join(f.bytes_list.value[0] for f in audio[:t]), np.uint8).reshape(t, AUDIO_DIM)], 1)
    except (ValueError, IndexError):
        raise ValueError(f"{where} has frames that are not {RGB_DIM} rgb and {AUDIO_DIM} audio bytes") from None
    context = seq.context.feature
    labels = np.asarray(context["labels"].int64_list.value if "labels" in context else [], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where} has label {int(labels.max() if labels.max() >= num_classes else labels.min())}, "
                         f"outside 0..{num_classes - 1}; set data.num_classes to the vocabulary's size")
    video_id = context["id"].bytes_list.value[0] if "id" in context and context["id"].bytes_list.value else b""
    return video_id, frames, labels


class YouTube8M:
    """The videos of some frame-level TFRecord files, indexed 0..N-1 in file then record order
    (or a subset of them), read on demand: memory holds two int64 per record."""

    def __init__(self, paths: Sequence[str | os.PathLike], *, num_classes: int, max_frames: int = 300,
                 indices: np.ndarray | None = None, files: list[TFRecordFile] | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer, got {max_frames!r}")
        self.files = files if files is not None else [TFRecordFile(p) for p in paths]
        self.num_classes, self.max_frames = num_classes, max_frames
        self.starts = np.cumsum([0] + [len(f) for f in self.files])
        total = int(self.starts[-1])
        self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    def subset(self, indices) -> YouTube8M:
        """The videos at `indices` (positions in this set), sharing the opened files."""
        return YouTube8M((), num_classes=self.num_classes, max_frames=self.max_frames,
                         indices=self.indices[np.asarray(indices, dtype=np.int64)], files=self.files)

    def item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Video i: quantized frames uint8 (T, 1152) and its multi-hot labels float32 (num_classes,)."""
        g = int(self.indices[i])
        f = int(np.searchsorted(self.starts, g, side="right")) - 1
        record = g - int(self.starts[f])
        file = self.files[f]
        _, frames, labels = parse_video(file.read(record), num_classes=self.num_classes, max_frames=self.max_frames,
                                        where=f"record {record} of '{file.path}'")
        hot = np.zeros(self.num_classes, dtype=np.float32)
        hot[labels] = 1.0
        return frames, hot

    def digest(self) -> str:
        """What the teacher cache names: the files (name, size, record count), the subset, the sizes."""
        h = hashlib.blake2b(digest_size=16)
        for f in self.files:
            h.update(f"{os.path.basename(f.path)}:{os.path.getsize(f.path)}:{len(f)};".encode())
        h.update(f"{self.num_classes}:{self.max_frames};".encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()


class _VideoBatches(torch.utils.data.Dataset):
    """Item: a list of indices -> their quantized frames, zero-padded to the longest, and labels."""

    def __init__(self, videos: YouTube8M):
        self.videos = videos

    def __getitem__(self, indices):
        try:
            items = [self.videos.item(int(i)) for i in indices]
        except ValueError as err:
            return {"error": str(err)}  # raised in the main process: one sentence, no worker traceback
        frames = torch.zeros(len(items), max(len(x) for x, _ in items), FEATURE_DIM, dtype=torch.uint8)
        for row, (x, _) in enumerate(items):
            frames[row, :len(x)] = torch.from_numpy(x)
        return {"frames": frames, "num_frames": torch.tensor([len(x) for x, _ in items]),
                "y": torch.from_numpy(np.stack([y for _, y in items])), "index": torch.as_tensor(indices)}


def _identity(item):
    return item


class YouTube8MLoader(SampledFrames, ShardedLoader):
    """Batches of a YouTube8M set with VideoLoader's order and interface, read by `workers` processes.

    A batch holds x float32 (B, T_b, 1152) dequantized on the device and zero after each video's
    frames, y float32 (B, C) multi-hot, and the indices; with `frames_per_video`, a training batch
    holds that many frames drawn from each video, as VideoLoader's.
    """

    def __init__(self, videos: YouTube8M, *, batch_size: int, train: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool | None = None, rank: int = 0,
                 world_size: int = 1, workers: int = 0, prefetch: int = 2, frames_per_video: int | None = None
                 ) -> None:
        super().__init__(len(videos), batch_size=batch_size, train=train, seed=seed, device=device,
                         drop_last=drop_last, rank=rank, world_size=world_size)
        self.frames_per_video = check_frames_per_video(frames_per_video)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be a non-negative integer, got {workers!r}.")
        self.videos, self.workers, self.prefetch = videos, workers, prefetch
        self.num_classes = videos.num_classes

    def batches(self, epoch: int | None, start: int = 0, view_epoch: int | None = None) -> Iterator[Batch]:
        """Yield the epoch's batches, skipping the first `start` (not read) to resume mid-epoch."""
        return self.batches_at(self.batch_indices(epoch, start), epoch if view_epoch is None else view_epoch)

    def batches_at(self, index_batches: Iterable[torch.Tensor], view_epoch: int | None = None) -> Iterator[Batch]:
        """The batches of the given dataset indices, in order (what the teacher cache computes)."""
        keys = [idx.cpu().tolist() for idx in index_batches]
        loader = torch.utils.data.DataLoader(
            _VideoBatches(self.videos), sampler=keys, batch_size=None, collate_fn=_identity,
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if self.workers else None, **worker_options(self.workers))
        for item in loader:
            if "error" in item:
                raise ValueError(item["error"])
            frames = item["frames"].to(self.device, non_blocking=True)
            num_frames, idx = item["num_frames"].to(self.device), item["index"].to(self.device)
            valid = torch.arange(frames.shape[1], device=self.device) < num_frames[:, None]
            x = dequantize(frames) * valid[..., None]  # padding stays zero: the models find it so
            yield Batch(self.frames(x, num_frames, idx, view_epoch), item["y"].to(self.device), idx)


    def fingerprint_data(self) -> dict:
        return {"num_samples": self.size, "image_shape": [self.videos.max_frames, FEATURE_DIM],
                "hash": self.videos.digest()}


def list_splits(root: str | os.PathLike) -> dict[str, list[str]]:
    """`root`'s train*.tfrecord, and validate*.tfrecord as the labelled held-out set (test*.tfrecord
    when there is no validate*: YouTube-8M's own test files carry no labels)."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root '{root}' is not a directory of YouTube-8M TFRecord files")
    names = sorted(os.listdir(root))

    def matching(prefix: str) -> list[str]:
        return [os.path.join(root, n) for n in names if n.startswith(prefix) and n.endswith(".tfrecord")]
    train, held = matching("train"), matching("validate") or matching("test")
    if not train or not held:
        raise FileNotFoundError(f"data.root '{root}' needs train*.tfrecord and validate*.tfrecord (or test*.tfrecord) "
                                f"files; found {len(train)} and {len(held)}")
    return {"train": train, "test": held}
