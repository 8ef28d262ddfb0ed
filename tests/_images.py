"""Generated image datasets for the streaming tests: folders of variable-size images and tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("RGB", "L", "P", "CMYK", "RGBA")


def random_image(rng: np.random.Generator, label: int, sizes=(20, 60), mode: str = "RGB") -> Image.Image:
    """A width x height image whose colour says its class (so a small net can learn it), in `mode`."""
    w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    base = np.zeros((h, w, 3), np.float64)
    base[..., label % 3] = 150 + 40 * (label // 3)
    pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "P":
        return image.convert("P", palette=Image.ADAPTIVE)
    return image if mode == "RGB" else image.convert(mode)


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if ext == "jpg" else "PNG", quality=90)
    return buf.getvalue()


def make_image_folder(root: Path, *, classes=("ant", "bee", "cat"), per_class=8, test_per_class=3, sizes=(20, 60),
                      seed=0, test_dir="test", modes=MODES) -> Path:
    """root/train/<class>/<i>.jpg|png and root/<test_dir>/<class>/..., sizes and modes varied."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), (test_dir, test_per_class)):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                mode = modes[i % len(modes)]
                # JPEG holds CMYK but no palette or alpha; PNG the reverse
                ext = "jpg" if mode == "CMYK" or (mode not in ("P", "RGBA") and i % 2 == 0) else "png"
                image = random_image(rng, label, sizes, mode)
                (folder / f"{i:04d}.{ext}").write_bytes(_encode(image, ext))
    return root


def make_tar_shards(root: Path, *, num_classes=3, per_shard=10, shards=2, test_shards=1, sizes=(20, 60), seed=0,
                    labels=True) -> Path:
    """root/train/000000.tar ... and root/test/000000.tar with members <key>.jpg|png and <key>.cls."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", shards), ("test", test_shards)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in range(count):
            with tarfile.open(root / split / f"{s:06d}.tar", "w") as tar:
                for i in range(per_shard):
                    key = f"{split}{s:02d}_{i:04d}"
                    label = int(rng.integers(0, num_classes)) if split != "train" else (s * per_shard + i) % num_classes
                    ext = "png" if i % 2 else "jpg"
                    members = [(f"{key}.{ext}", _encode(random_image(rng, label, sizes), ext))]
                    if labels:
                        members.append((f"{key}.cls", str(label).encode()))
                    for name, data in members:
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return root
