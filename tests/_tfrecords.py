"""Generated YouTube-8M frame-level TFRecords, written with the tfrecord package's writer."""

from __future__ import annotations

import numpy as np
from tfrecord import TFRecordWriter

from ensemble_kd.data.youtube8m import FEATURE_DIM

CLASSES = 8


def make_videos(n: int, seed: int, max_len: int = 12):
    """n (id, quantized frames (T, 1152) uint8, labels) triples, 1..max_len frames and 1-3 labels each."""
    rng = np.random.default_rng(seed)
    return [(f"v{seed}-{i}".encode(), rng.integers(0, 256, (rng.integers(1, max_len + 1), FEATURE_DIM), dtype=np.uint8),
             np.unique(rng.integers(0, CLASSES, rng.integers(1, 4)))) for i in range(n)]


def write_tfrecord(path, videos) -> None:
    """YouTube-8M's layout: context id and labels, feature lists rgb (1024 bytes) and audio (128 bytes) per frame."""
    writer = TFRecordWriter(str(path))
    for video_id, frames, labels in videos:
        writer.write({"id": (video_id, "byte"), "labels": (labels.tolist(), "int")},
                     {"rgb": ([f[:1024].tobytes() for f in frames], "byte"),
                      "audio": ([f[1024:].tobytes() for f in frames], "byte")})
    writer.close()
