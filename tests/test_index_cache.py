"""The index cache: a tar shard's or a TFRecord file's offset index is read back by the next opening
(its builder is not called again) and gives the same samples and bytes; it is built again when the
file changes, when its entry is corrupt or another file's, when the cache cannot be written (one
warning), and every time when the cache is turned off. Bad files raise at every opening."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ensemble_kd.data import index_cache, samples
from ensemble_kd.data.index_cache import ENV_VAR, index_cache_dir
from ensemble_kd.data.samples import list_tar_shards
from ensemble_kd.data.youtube8m import TFRecordFile, YouTube8M, parse_video

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_tar_shards  # noqa: E402
from _tfrecords import CLASSES, make_videos, write_tfrecord  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "index-cache"
    monkeypatch.setenv(ENV_VAR, str(directory))
    monkeypatch.setattr(index_cache, "_warned", set())
    return directory


def _count_builds(monkeypatch, owner, name: str) -> list[str]:
    """Record each call of owner.name (a builder) with its file; calls go through to the real one."""
    calls, real = [], getattr(owner, name)

    def counted(self_or_path, *args):
        calls.append(str(getattr(self_or_path, "path", self_or_path)))
        return real(self_or_path, *args)
    monkeypatch.setattr(owner, name, counted)
    return calls


def _forbid_builds(monkeypatch, owner, name: str) -> None:
    def refuse(*args):
        raise AssertionError("the index was built again instead of read from the cache")
    monkeypatch.setattr(owner, name, refuse)


def _tar_listing(split) -> tuple:
    return (split.digest(), split.classes, [split.name(i) for i in range(len(split))], split.labels.tolist(),
            [split.read(i) for i in range(len(split))])


def _videos(paths) -> tuple[list[bytes], str]:
    ds = YouTube8M(paths, num_classes=CLASSES)
    return [ds.files[f].read(r) for f in range(len(ds.files)) for r in range(len(ds.files[f]))], ds.digest()


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_tar_shards(tmp_path / "shards", num_classes=3, per_shard=6, shards=2, test_shards=1)


@pytest.fixture
def records(tmp_path) -> list[Path]:
    paths = [tmp_path / "yt" / "train0000.tfrecord", tmp_path / "yt" / "train0001.tfrecord"]
    paths[0].parent.mkdir()
    for seed, path in enumerate(paths):
        write_tfrecord(path, make_videos(7 + seed, seed))
    return paths


# ----------------------------------------------------------------------------- read back

def test_a_second_listing_of_tar_shards_reads_the_cache_and_gives_the_same_samples(cache, shards, monkeypatch):
    data_before = sorted(str(p) for p in shards.rglob("*"))
    builds = _count_builds(monkeypatch, samples, "_index_shard")
    first = [_tar_listing(s) for s in list_tar_shards(shards, 16)]
    assert len(builds) == 3 and len(first[0][2]) == 12
    entries = _entries(cache)
    assert len(entries) == 3 and all(e.startswith("tar-") and e.endswith(".npz") for e in entries)  # no temp files
    _forbid_builds(monkeypatch, samples, "_index_shard")
    assert [_tar_listing(s) for s in list_tar_shards(shards, 16)] == first
    assert sorted(str(p) for p in shards.rglob("*")) == data_before  # nothing written beside the data
    with np.load(cache / entries[0], allow_pickle=False) as entry:  # plain arrays, no pickle
        assert {"names", "name_offsets", "labels", "offsets", "sizes"} <= set(entry.files)


def test_a_second_opening_of_tfrecords_reads_the_cache_and_gives_the_same_records(cache, records, monkeypatch):
    builds = _count_builds(monkeypatch, TFRecordFile, "_scan")
    first = _videos(records)
    assert builds == [str(p) for p in records] and len(first[0]) == 15
    assert len(_entries(cache)) == 2
    _forbid_builds(monkeypatch, TFRecordFile, "_scan")
    again = YouTube8M(records, num_classes=CLASSES)
    assert _videos(records) == first and again.files[0].offsets[0] == 12
    assert again.files[1].offsets.dtype == np.int64 and again.files[1].lengths.dtype == np.int64


# ----------------------------------------------------------------------------- rebuilt

def test_a_touched_or_rewritten_shard_is_indexed_again(cache, shards, monkeypatch):
    list_tar_shards(shards, 16)
    builds = _count_builds(monkeypatch, samples, "_index_shard")
    shard = shards / "train" / "000001.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime, the same bytes
    list_tar_shards(shards, 16)
    assert builds == [str(shard)]
    make_tar_shards(shards, num_classes=3, per_shard=4, shards=2, test_shards=1, seed=5)  # new sizes
    train, test = list_tar_shards(shards, 16)
    assert len(builds) == 4 and (len(train), len(test)) == (8, 4)
    with pytest.MonkeyPatch.context() as off:
        off.setenv(ENV_VAR, "off")
        assert [_tar_listing(s) for s in list_tar_shards(shards, 16)] == [_tar_listing(train), _tar_listing(test)]


def test_a_rewritten_tfrecord_file_is_indexed_again(cache, records, monkeypatch):
    YouTube8M(records, num_classes=CLASSES)
    builds = _count_builds(monkeypatch, TFRecordFile, "_scan")
    write_tfrecord(records[1], make_videos(11, 9))
    ds = YouTube8M(records, num_classes=CLASSES)
    assert builds == [str(records[1])] and len(ds) == 7 + 11
    assert parse_video(ds.files[1].read(10), num_classes=CLASSES, max_frames=300)[0] == b"v9-10"


def test_a_file_changed_while_it_is_indexed_leaves_no_entry(cache, records, monkeypatch):
    real = TFRecordFile._scan

    def scan_while_touched(self):
        index = real(self)
        os.utime(self.path, ns=(0, os.stat(self.path).st_mtime_ns + 1_000_000))
        return index
    monkeypatch.setattr(TFRecordFile, "_scan", scan_while_touched)
    assert len(TFRecordFile(records[0])) == 7
    assert _entries(cache) == []  # the index may describe neither version: not kept


CORRUPTIONS = {
    "garbage": lambda entry, other: entry.write_bytes(b"this is not an npz file"),
    "truncated": lambda entry, other: entry.write_bytes(entry.read_bytes()[:len(entry.read_bytes()) // 2]),
    "a flipped byte": lambda entry, other: entry.write_bytes(_flip(entry.read_bytes(), np.int64(12).tobytes())),
    "empty": lambda entry, other: entry.write_bytes(b""),
    "another file's entry": lambda entry, other: entry.write_bytes(other.read_bytes()),
    "other fields": lambda entry, other: np.savez(entry, offsets=np.zeros(3, np.int64)),
    "other dtypes": lambda entry, other: _rewrite(entry, offsets=lambda a: a.astype(np.float64)),
}


def _rewrite(entry: Path, **change) -> None:
    """The entry with some arrays changed, the rest (its stamp and source among them) kept."""
    with np.load(entry, allow_pickle=False) as stored:
        arrays = {name: change.get(name, lambda a: a)(stored[name]) for name in stored.files}
    np.savez(entry, **arrays)


def _entry_of(cache: Path, path: Path) -> Path:
    for name in _entries(cache):
        with np.load(cache / name, allow_pickle=False) as entry:
            if entry["_source"].tobytes().decode() == os.path.realpath(path):
                return cache / name
    raise AssertionError(f"no entry for {path}")


def _flip(data: bytes, inside: bytes) -> bytes:
    """`data` with one bit flipped in the first occurrence of `inside` (an array's values, not a header)."""
    out = bytearray(data)
    out[data.index(inside)] ^= 1
    return bytes(out)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_entry_is_rebuilt_not_trusted(cache, tmp_path, monkeypatch, corruption):
    paths = [tmp_path / "a.tfrecord", tmp_path / "b.tfrecord"]
    for path in paths:  # the same records: only the entry's own path tells the two entries apart
        write_tfrecord(path, make_videos(5, 0))
    os.utime(paths[1], ns=(0, paths[0].stat().st_mtime_ns))
    first = _videos(paths)
    entry_a, entry_b = (_entry_of(cache, p) for p in paths)
    CORRUPTIONS[corruption](entry_b, entry_a)
    builds = _count_builds(monkeypatch, TFRecordFile, "_scan")
    assert _videos(paths) == first and builds == [str(paths[1])]
    _forbid_builds(monkeypatch, TFRecordFile, "_scan")  # the rebuilt entry is whole again
    assert _videos(paths) == first


INCONSISTENT_TAR = {  # each keeps the entry readable, of the right fields and dtypes, and this file's stamp
    "arrays of different lengths": dict(labels=lambda a: a[:-1]),
    "offsets beyond the file": dict(offsets=lambda a: a + 10**6),
    "negative offsets": dict(offsets=lambda a: -a),
    "names cut elsewhere": dict(name_offsets=lambda a: a[::-1].copy()),
}
INCONSISTENT_TFRECORD = {
    "arrays of different lengths": dict(lengths=lambda a: a[:-1]),
    "offsets beyond the file": dict(offsets=lambda a: a + 10**6),
    "offsets out of order": dict(offsets=lambda a: a[::-1].copy(), lengths=lambda a: a[::-1].copy()),
    "negative lengths": dict(lengths=lambda a: -a),
    "a record left out": dict(offsets=lambda a: a[:-1], lengths=lambda a: a[:-1]),
}


@pytest.mark.parametrize("corruption", list(INCONSISTENT_TAR))
def test_an_inconsistent_tar_entry_is_rebuilt_not_trusted(cache, shards, monkeypatch, corruption):
    first = [_tar_listing(s) for s in list_tar_shards(shards, 16)]
    shard = shards / "train" / "000001.tar"
    _rewrite(_entry_of(cache, shard), **INCONSISTENT_TAR[corruption])
    builds = _count_builds(monkeypatch, samples, "_index_shard")
    assert [_tar_listing(s) for s in list_tar_shards(shards, 16)] == first and builds == [str(shard)]


@pytest.mark.parametrize("corruption", list(INCONSISTENT_TFRECORD))
def test_an_inconsistent_tfrecord_entry_is_rebuilt_not_trusted(cache, records, monkeypatch, corruption):
    first = _videos(records)
    _rewrite(_entry_of(cache, records[1]), **INCONSISTENT_TFRECORD[corruption])
    builds = _count_builds(monkeypatch, TFRecordFile, "_scan")
    assert _videos(records) == first and builds == [str(records[1])]


# ----------------------------------------------------------------------------- no cache

def test_an_unwritable_cache_directory_costs_the_rebuild_and_one_warning(tmp_path, shards, records, monkeypatch,
                                                                         capsys):
    (tmp_path / "a-file").write_text("a cache directory cannot be made under a file, not even by root")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "a-file" / "indices"))
    monkeypatch.setattr(index_cache, "_warned", set())
    builds = _count_builds(monkeypatch, samples, "_index_shard")
    listings = [[_tar_listing(s) for s in list_tar_shards(shards, 16)] for _ in range(2)]
    assert listings[0] == listings[1] and len(builds) == 6
    assert len(TFRecordFile(records[0])) == 7
    warnings = [line for line in capsys.readouterr().err.splitlines() if "index cache" in line]
    assert len(warnings) == 1 and "cannot write the index cache" in warnings[0]


def test_a_write_that_fails_midway_leaves_no_entry_and_no_temporary_file(cache, records, monkeypatch, capsys):
    def savez_then_fail(file, **arrays):
        file.write(b"PK\x03\x04 half an entry")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(index_cache.np, "savez", savez_then_fail)
    assert len(TFRecordFile(records[0])) == 7
    assert _entries(cache) == [] and "No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["", "off"])
def test_the_cache_turned_off_indexes_every_time_and_writes_nothing(tmp_path, shards, monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert index_cache_dir() is None
    builds = _count_builds(monkeypatch, samples, "_index_shard")
    list_tar_shards(shards, 16)
    list_tar_shards(shards, 16)
    assert len(builds) == 6 and not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_the_cache_directory_comes_from_the_variable_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    assert index_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert index_cache_dir() == tmp_path / "xdg" / "ensemble-kd" / "indices"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert index_cache_dir() == tmp_path / "home" / ".cache" / "ensemble-kd" / "indices"


def test_the_suite_keeps_indices_out_of_the_users_cache():
    assert index_cache_dir() is not None and Path.home() not in index_cache_dir().parents


# ----------------------------------------------------------------------------- bad files

def test_bad_files_raise_at_every_opening_and_leave_no_entry(cache, tmp_path):
    nolabels = make_tar_shards(tmp_path / "nolabels", labels=False, shards=1)
    cut = tmp_path / "cut.tfrecord"
    write_tfrecord(cut, make_videos(3, 0))
    cut.write_bytes(cut.read_bytes()[:-10])
    for _ in range(2):
        with pytest.raises(ValueError, match=r"train00_0000\.jpg in tar shard .*000000\.tar has no label"):
            list_tar_shards(nolabels, 16)
        with pytest.raises(ValueError, match=r"'.*cut.tfrecord' is truncated: record 2 starts at byte \d+"):
            TFRecordFile(cut)
    assert _entries(cache) == []
