"""Write a small ImageNet-style folder: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG.

Each class is a shape (disc, square, triangle, bars, ring) in one of two colour families,
drawn at a random place, size and angle on a noisy textured background, so a small network
can learn it from random resized crops. Images are 64-160 px on each side, chosen per image;
about 3% are saved grayscale ("L"), palette ("P") or CMYK, to exercise the RGB conversion.

    python examples/make_imagenet_style.py data/imagenet-style --train 200 --val 50
    ensemble-kd train-teachers configs/synthetic_imagenet_cpu.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "bars", "ring")
# Two colour families per shape: class k = shape k % 5, family k // 5 (warm or cool hues).
HUES = ((0.00, 0.12), (0.50, 0.68))


def class_names(count: int) -> list[str]:
    """ImageNet-like synsets, n0000000k, so the folder sorts as ImageNet's does."""
    return [f"n{k:08d}" for k in range(count)]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def draw_image(k: int, rng: np.random.Generator, lo: int, hi: int) -> Image.Image:
    """One RGB image of class k: the class's shape and hue family over a random texture."""
    w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    texture = rng.integers(0, 256, (h // 12 + 2, w // 12 + 2, 3)).astype(np.uint8)
    image = Image.fromarray(texture).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    lo_h, hi_h = HUES[(k // len(SHAPES)) % len(HUES)]
    colour = _hsv_to_rgb(rng.uniform(lo_h, hi_h), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    side = min(w, h)
    r = int(side * rng.uniform(0.25, 0.42))
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    shape = SHAPES[k % len(SHAPES)]
    if shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * np.pi)
        pts = [(cx + r * np.cos(a + t), cy + r * np.sin(a + t)) for t in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        draw.polygon(pts, fill=colour)
    elif shape == "bars":
        step = max(4, r // 2)
        for x in range(cx - r, cx + r, step):
            draw.rectangle((x, cy - r, x + step // 2, cy + r), fill=colour)
    else:  # ring
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(3, r // 3))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _odd_mode(image: Image.Image, roll: float) -> Image.Image:
    """About 1% each grayscale, palette and CMYK; the rest stay RGB."""
    if roll < 0.01:
        return image.convert("L")
    if roll < 0.02:
        return image.convert("P", palette=Image.ADAPTIVE)
    if roll < 0.03:
        return image.convert("CMYK")
    return image


def make_folder(root: Path, classes: int = 10, train: int = 200, val: int = 50, lo: int = 64, hi: int = 160,
                seed: int = 0) -> dict[str, int]:
    """Write the tree (JPEG; palette images as PNG, which JPEG cannot hold); returns counts per mode."""
    rng = np.random.default_rng(seed)
    modes: dict[str, int] = {}
    for split, per_class in (("train", train), ("val", val)):
        for k, name in enumerate(class_names(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = _odd_mode(draw_image(k, rng, lo, hi), float(rng.random()))
                modes[image.mode] = modes.get(image.mode, 0) + 1
                if image.mode == "P":
                    image.save(folder / f"{name}_{i:05d}.png")
                else:
                    image.save(folder / f"{name}_{i:05d}.JPEG", quality=90)
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=200, help="training images per class")
    parser.add_argument("--val", type=int, default=50, help="validation images per class")
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.classes > 2 * len(SHAPES):
        parser.error(f"--classes is at most {2 * len(SHAPES)} (5 shapes x 2 colour families).")
    modes = make_folder(args.root, args.classes, args.train, args.val, args.min_size, args.max_size, args.seed)
    print(f"{args.root}: {args.classes} classes, {args.train}+{args.val} images each, modes {modes}")


if __name__ == "__main__":
    main()
