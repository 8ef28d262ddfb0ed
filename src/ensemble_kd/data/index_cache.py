"""Offset indices of data files kept on disk, so that a process opening a tar shard or a TFRecord
file it (or another rank, or an earlier run) has indexed before reads one small .npz instead of
walking the whole file again (minutes at ImageNet or YouTube-8M scale, per process).

An entry is a file's index as flat numpy arrays, stored without pickle under the cache directory:
$ENSEMBLE_KD_INDEX_CACHE, else $XDG_CACHE_HOME/ensemble-kd/indices, else ~/.cache/ensemble-kd/indices
(never beside the data, which is often read-only); ENSEMBLE_KD_INDEX_CACHE set to "" or "off" turns
it off. It is named by a hash of the file's resolved path and the format version, and holds the
file's size and mtime_ns: when either differs from the file's now, the index is built again. An
entry is written (to a temporary file, then renamed over, so concurrent readers see a whole entry
or none) only after a build succeeded, so the errors a build raises for a bad file are raised
every time. An entry that cannot be read, does not hold what was asked for, or whose arrays do not
describe a file of its size (the caller's `check`: lengths that agree, offsets within the file) is
built again; a directory that cannot be written costs the rebuild and one warning line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["ENV_VAR", "cached_index", "index_cache_dir"]

ENV_VAR = "ENSEMBLE_KD_INDEX_CACHE"
FORMAT_VERSION = 1  # bump when any kind's arrays change meaning: old entries are then never looked up
_STAMP = "_stamp"  # int64 [format version, file size, file mtime_ns]
_SOURCE = "_source"  # the resolved path as utf-8 bytes: what the entry says it indexes
_warned: set[str] = set()  # directories already reported unwritable in this process


def index_cache_dir() -> Path | None:
    """Where entries live, or None when the cache is turned off."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in ("", "off") else Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ensemble-kd" / "indices"


def _stamp(path: str) -> np.ndarray:
    st = os.stat(path)
    return np.array([FORMAT_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _load(entry: Path, source: bytes, stamp: np.ndarray, fields: Mapping[str, DTypeLike],
          check: Callable[[dict, int], bool] | None) -> dict | None:
    """The entry's arrays if it is whole, is this file's index as it is now and passes `check`; else None."""
    try:
        with np.load(entry, allow_pickle=False) as stored:
            if not np.array_equal(stored[_STAMP], stamp) or stored[_SOURCE].tobytes() != source:
                return None
            arrays = {name: stored[name] for name in fields}  # reading a member checks its zip crc
    except Exception:  # missing, torn, not a zip, a bad header, a field lacking: whatever it is, it is rebuilt
        return None
    if any(a.dtype != np.dtype(fields[n]) or a.ndim != 1 for n, a in arrays.items()):
        return None
    if check is not None and not check(arrays, int(stamp[1])):  # a healthy sample blamed for a bad entry
        return None
    return arrays


def _save(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, entry)  # same directory: readers see the old entry, or none, or the whole new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _built(build: Callable[[], Mapping], fields: Mapping[str, DTypeLike]) -> dict[str, np.ndarray]:
    return {name: np.asarray(a, dtype=fields[name]) for name, a in build().items()}


def cached_index(path: str | os.PathLike, kind: str, build: Callable[[], Mapping[str, np.ndarray]],
                 fields: Mapping[str, DTypeLike], check: Callable[[dict, int], bool] | None = None
                 ) -> dict[str, np.ndarray]:
    """The index of the file at `path`: `fields` (name -> dtype, each a 1-D array) read from its
    entry when that is valid (and `check(arrays, file_size)` holds), else `build()`, which is then
    stored for the next process."""
    directory = index_cache_dir()
    if directory is None:
        return _built(build, fields)
    resolved = os.path.realpath(path)
    source = resolved.encode("utf-8", "surrogateescape")
    key = hashlib.sha256(f"{kind}\0{FORMAT_VERSION}\0".encode() + source).hexdigest()
    entry = directory / f"{kind}-{key}.npz"
    before = _stamp(resolved)
    found = _load(entry, source, before, fields, check)
    if found is not None:
        return found
    arrays = _built(build, fields)
    if not np.array_equal(_stamp(resolved), before):
        return arrays  # the file changed while it was read: this index may describe neither version
    try:
        _save(entry, {**arrays, _STAMP: before, _SOURCE: np.frombuffer(source, np.uint8)})
    except OSError as err:
        if str(directory) not in _warned:
            _warned.add(str(directory))
            print(f"warning: cannot write the index cache in {directory} ({err}); indices are rebuilt at "
                  f"every start (set {ENV_VAR} to a writable directory, or to 'off')", file=sys.stderr, flush=True)
    return arrays
