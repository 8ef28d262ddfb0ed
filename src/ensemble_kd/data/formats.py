"""Readers for the on-disk formats: IDX (MNIST family), CIFAR python pickles, image folders.

Each reader returns numpy arrays (images uint8 (N, C, H, W), labels int64 (N,)) and fails
with one sentence that names the file and says what to fix.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from ..progress import quiet_progress

__all__ = [
    "read_idx",
    "find_idx_file",
    "load_idx_pair",
    "load_cifar",
    "load_image_folder",
    "MixedImageSizes",
    "check_labels",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# IDX type codes -> numpy dtype (multi-byte types are big-endian on disk).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raise ValueError if any label lies outside 0..num_classes-1."""
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{source} has label {bad} but the dataset has {num_classes} classes "
            f"(labels must be 0..{num_classes - 1}); the file is mislabelled or belongs to another dataset."
        )


# ----------------------------------------------------------------------------- IDX


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path} is a truncated or corrupt gzip file ({exc}); download it again.") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or plain) into an array of the shape its header declares."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise ValueError(f"{path} is too short ({len(data)} bytes) to be an IDX file; download it again.")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path} has bad magic number 0x{data[:4].hex()} (expected 0x0000 followed by a type code "
            f"and the number of dimensions, e.g. 0x00000803 for images); it is not an IDX file."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated inside its header ({len(data)} of {header} bytes); download it again.")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(data) < expected:
        raise ValueError(
            f"{path} is truncated: its header says {dims[0]} items of shape {dims[1:]} "
            f"({expected} bytes) but the file has only {len(data)} bytes; download it again."
        )
    if len(data) > expected:
        raise ValueError(
            f"{path} has {len(data) - expected} bytes after the {dims[0]} items its header declares; "
            f"the file is corrupt, download it again."
        )
    # frombuffer avoids a Python-level parse; copy so torch gets a writable array.
    return np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims).copy()


def find_idx_file(root: Path, stem: str) -> Path | None:
    """The path of `stem` or `stem.gz` under root, or None if neither exists."""
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_idx_pair(root: Path, prefix: str, num_classes: int, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Images (N,1,H,W) uint8 and labels (N,) int64 from `{prefix}-images-idx3-ubyte` and `-labels-idx1-ubyte`."""
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [find_idx_file(root, s) for s in stems]
    for stem, p in zip(stems, paths):
        if p is None:
            raise FileNotFoundError(
                f"{root / stem}(.gz) not found: expected the IDX file {stem} or {stem}.gz in {root}{hint}."
            )
    img_path, lbl_path = paths
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{img_path} holds {images.dtype} data of shape {images.shape}; "
            f"expected uint8 images (N, H, W)."
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{lbl_path} holds {labels.dtype} data of shape {labels.shape}; expected uint8 labels (N,).")
    if len(images) != len(labels):
        raise ValueError(
            f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels; "
            f"the counts must match (one of the files is from another split or corrupt)."
        )
    labels = labels.astype(np.int64)
    check_labels(labels, num_classes, str(lbl_path))
    return images[:, None], labels


# ----------------------------------------------------------------------------- CIFAR

# Only what numpy arrays and plain containers need: a CIFAR batch must not run code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys (Python 2 and 3 pickles alike)."""
    try:
        with path.open("rb") as f:
            # latin1 decodes the Python 2 strings of the official files without touching array bytes.
            obj = _SafeUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(
            f"{path} is not a readable CIFAR python pickle ({exc}); "
            f"download the python version again."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR python batch; check the file.")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _as_str(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


_CIFAR = {
    # name: (folder, train files, test files, meta file, label key, names key, num_classes)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_dir(root: Path, name: str) -> Path:
    folder, train_files = _CIFAR[name][0], _CIFAR[name][1]
    for cand in (root, root / folder):
        if (cand / train_files[0]).is_file():
            return cand
    if not root.exists():
        raise FileNotFoundError(
            f"{root} does not exist: for {name} set root (data.root) to the extracted {folder} folder or its parent."
        )
    base = root / folder if (root / folder).is_dir() else root
    raise FileNotFoundError(
        f"{base / train_files[0]} not found: for {name} set root (data.root) to the extracted {folder} folder "
        f"(with {', '.join(train_files + _CIFAR[name][2])}) or its parent."
    )


def _read_cifar_files(base: Path, files: tuple[str, ...], label_key: str, num_classes: int, name: str):
    images, labels = [], []
    for fname in files:
        path = base / fname
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a {name} folder needs {', '.join(files)}; "
                f"extract the archive again."
            )
        batch = _load_pickle(path)
        for key in ("data", label_key):
            if key not in batch:
                raise ValueError(
                    f"{path} has no '{key}' entry (keys: {sorted(map(str, batch))}); "
                    f"it is not a {name} batch."
                )
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path} has data of dtype {data.dtype} and shape {data.shape}; expected uint8 (N, 3072).")
        if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(
                f"{path} has {len(data)} images but {lab.size} '{label_key}' of dtype {lab.dtype}; "
                f"expected one integer label per image."
            )
        lab = lab.astype(np.int64)
        check_labels(lab, num_classes, str(path))
        # Rows are 1024 R, then G, then B values, each a row-major 32x32 plane.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(root: str | Path, name: str):
    """Train and test arrays plus class names of CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100")."""
    folder, train_files, test_files, meta_file, label_key, names_key, k = _CIFAR[name]
    base = _cifar_dir(Path(root).expanduser(), name)
    train = _read_cifar_files(base, train_files, label_key, k, name)
    test = _read_cifar_files(base, test_files, label_key, k, name)
    meta_path = base / meta_file
    if meta_path.is_file():
        meta = _load_pickle(meta_path)
        if names_key not in meta:
            raise ValueError(f"{meta_path} has no '{names_key}' entry; it is not the {name} meta file.")
        classes = tuple(_as_str(c) for c in meta[names_key])
        if len(classes) != k:
            raise ValueError(
                f"{meta_path} lists {len(classes)} class names but {name} has {k} classes; "
                f"check the file."
            )
    else:  # the meta file only carries names; the data is usable without it
        classes = CIFAR10_CLASSES if name == "cifar10" else tuple(str(i) for i in range(k))
    return train, test, classes


# ----------------------------------------------------------------------------- image folders

_GRAY_MODES = {"1", "L", "LA"}
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "F"}

class MixedImageSizes(ValueError):
    """An image folder held in memory whose images are not all one size; `found` names two that differ."""

    def __init__(self, found: str):
        super().__init__(f"{found}; resize all images of an image folder to one size.")
        self.found = found


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _read_image(path: Path) -> np.ndarray:
    """(H, W) for grayscale images, (H, W, 3) otherwise, uint8."""
    from PIL import Image  # matplotlib depends on Pillow; import late so the package imports without it

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in _WIDE_MODES:
                return np.asarray(im.convert("L" if mode in _GRAY_MODES else "RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {path} ({exc}); remove or replace the file.") from None
    raise ValueError(f"image {path} has {mode} pixels; image folders need 8-bit grayscale or color images.")


def _read_split(split_dir: Path, classes: list[str]) -> tuple[list[np.ndarray], np.ndarray, list[Path]]:
    arrays, labels, paths = [], [], []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue  # a test split may lack a class
        files = _image_files(folder)
        if not files:
            raise ValueError(
                f"class folder {folder} is empty: it holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder."
            )
        labels += [label] * len(files)
        paths += files
    progress = quiet_progress()  # 60,000 files take a minute or more: a line every 30 s says how far
    task = progress.add_task(f"reading {split_dir}", total=len(paths), images_per_step=1)
    for f in paths:
        arrays.append(_read_image(f))
        progress.update(task, advance=1)
    return arrays, np.asarray(labels, dtype=np.int64), paths


def load_image_folder(root: str | Path):
    """Train and test arrays, class names, and validation arrays (or None) from
    root/{train,test,val}/<class>/<image files>: root/val/ is the test split when there is no
    root/test/ (ImageNet's layout), else the validation split."""
    root = Path(root).expanduser()
    layout = "root/train/<class>/<images> and root/test/<class>/<images> (or root/val/<class>/<images>)"
    test_name = "test" if (root / "test").is_dir() or not (root / "val").is_dir() else "val"
    for split in ("train", test_name):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} not found: an image folder dataset needs {layout}.")
    classes = [p.name for p in _class_folders(root / "train")]
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders; an image folder dataset needs {layout}.")
    extra = [p.name for p in _class_folders(root / test_name) if p.name not in classes]
    if extra:
        raise ValueError(
            f"{root / test_name} has class folders {extra} that {root / 'train'} lacks; "
            f"every test class needs training images."
        )
    train = _read_split(root / "train", classes)
    test = _read_split(root / test_name, classes)
    own_val = test_name == "test" and (root / "val").is_dir()  # see samples.own_val_dir
    val = _read_split(root / "val", classes) if own_val else ([], None, [])
    arrays = train[0] + test[0] + val[0]
    paths = train[2] + test[2] + val[2]
    if not test[0]:
        raise ValueError(f"{root / test_name} holds no images; an image folder dataset needs {layout}.")
    size = arrays[0].shape[:2]
    for a, p in zip(arrays, paths):
        if a.shape[:2] != size:
            raise MixedImageSizes(f"image {p} is {a.shape[1]}x{a.shape[0]} but {paths[0]} is {size[1]}x{size[0]}")
    color = any(a.ndim == 3 for a in arrays)

    def stack(items: list[np.ndarray]) -> np.ndarray:
        if color:  # grayscale images join a color dataset as three equal channels
            items = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in items]
            return np.stack(items).transpose(0, 3, 1, 2).copy()
        return np.stack(items)[:, None]

    return ((stack(train[0]), train[1]), (stack(test[0]), test[1]), tuple(classes),
            (stack(val[0]), val[1]) if own_val else None)
