"""The teacher cache at scale: shards written as the build goes, a killed build resumed to the same
bytes, rows read memory-mapped (memory that does not grow with the cache), any world size."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kd.data.loader import ShardedLoader
from ensemble_kd.ensemble.cache import CACHE_MANIFEST, CacheMismatchError, build_cache, open_cache
from ensemble_kd.ensemble.cache_store import cache_bytes, describe_size

sys.path.insert(0, str(Path(__file__).parent))
from _cache_fakes import FakeLoader, KillingLoader, fake_teachers  # noqa: E402

N = 3000
BUILD = dict(epochs=2, top_k=10, batch_size=256, shard_size=512)  # 12 batches, 6 shards an epoch (as _cache_fakes)


@pytest.fixture(scope="module")
def teachers():
    return fake_teachers()


@pytest.fixture(scope="module")
def whole(teachers, tmp_path_factory):
    """An uninterrupted build, with what it reported."""
    lines = []
    out = build_cache(teachers, FakeLoader(N), tmp_path_factory.mktemp("whole"), report=lines.append, **BUILD)
    return out, lines


def _contents(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir())}


def _run_helper(*args) -> subprocess.CompletedProcess:
    helper = Path(__file__).with_name("_cache_fakes.py")
    done = subprocess.run([sys.executable, str(helper), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": ":".join([str(helper.parent), *sys.path]), "OMP_NUM_THREADS": "1"})
    return done


def test_a_build_stopped_by_an_error_resumes_to_the_uninterrupted_cache(teachers, whole, tmp_path):
    with pytest.raises(RuntimeError, match="killed"):  # during batch 8: shards 0-2 (batches 1-6) are written
        build_cache(teachers, KillingLoader(N, after=7), tmp_path, **BUILD)
    record = json.loads((tmp_path / "progress.rank0.json").read_text())
    assert record["rows"] == [[512] * 3, []] and not record["complete"]
    assert not json.loads((tmp_path / CACHE_MANIFEST).read_text())["complete"]
    with pytest.raises(FileNotFoundError, match="is incomplete .* run the same cache-teachers command again"):
        open_cache(tmp_path, teachers, FakeLoader(N))
    loader, lines = FakeLoader(N), []
    build_cache(teachers, loader, tmp_path, report=lines.append, **BUILD)
    assert loader.yielded == 2 * 12 - 6  # only the unfinished shards were computed
    assert lines[1] == "cache: resuming, 3 shards of rank 0 already written"
    assert _contents(tmp_path) == _contents(whole[0])
    again = FakeLoader(N)
    build_cache(teachers, again, tmp_path, **BUILD)  # finished: nothing to do
    assert again.yielded == 0
    build_cache(teachers, again, tmp_path, **{**BUILD, "top_k": 5})  # other settings: a fresh build
    assert again.yielded == 24 and json.loads((tmp_path / CACHE_MANIFEST).read_text())["top_k"] == 5


def test_a_build_killed_by_sigkill_resumes_to_the_uninterrupted_cache(teachers, whole, tmp_path):
    done = _run_helper(tmp_path, 9)
    assert done.returncode == -9, done.stderr[-2000:]  # killed in batch 10: no cleanup ran
    assert json.loads((tmp_path / "progress.rank0.json").read_text())["rows"] == [[512] * 4, []]
    loader = FakeLoader(N)
    build_cache(teachers, loader, tmp_path, **BUILD)
    assert loader.yielded == 2 * 12 - 8
    assert _contents(tmp_path) == _contents(whole[0])


def _data_bytes(path: Path) -> int:
    mapped = np.load(path, mmap_mode="r")  # its offset: where the header ends
    assert path.stat().st_size - mapped.offset == mapped.nbytes
    return mapped.nbytes


def test_the_size_printed_first_is_the_bytes_written(whole, teachers, tmp_path):
    out, lines = whole
    expected = cache_bytes(N, 4, 100, 2, top_k=10, dtype="float16")
    assert expected == 2 * N * (4 * (10 * 2 + 10 * 2 + 2) + 1)  # values fp16, classes int16, fill fp16; present
    assert sum(_data_bytes(p) for p in out.glob("*.npy")) == expected
    assert lines[0] == describe_size(N, 4, 100, 2, top_k=10) == "cache: 3,000 images x 4 teachers x 2 epochs, top-10 fp16 -> 1.0 MB"
    full = build_cache(teachers, FakeLoader(500), tmp_path, epochs=1, dtype="float32", shard_size=200)
    assert sum(_data_bytes(p) for p in full.glob("*.npy")) == cache_bytes(500, 4, 100, dtype="float32")
    # ImageNet: 1.28M images, top-10 fp16 logits + int16 classes + fill, 4 teachers (BENCHMARKS.md: ~0.2 GB)
    assert describe_size(1_281_167, 4, 1000, 1, top_k=10) == \
        "cache: 1,281,167 images x 4 teachers x 1 epoch, top-10 fp16 -> 0.22 GB"


def test_memory_mapped_rows_are_the_stored_rows(whole, teachers):
    out = whole[0]
    cached = open_cache(out, teachers, FakeLoader(N))
    index = torch.from_numpy(np.random.default_rng(0).integers(0, N, 700))  # every shard's rows, repeats too
    for epoch in (0, 1, 3):
        rows = {k: np.load(out / f"epoch_{epoch % 2:03d}.{k}.npy")[index.numpy()] for k in ("values", "classes", "fill")}
        want = np.repeat(rows["fill"][..., None].astype(np.float32), 100, axis=-1)
        np.put_along_axis(want, rows["classes"].astype(np.int64), rows["values"].astype(np.float32), axis=-1)
        assert torch.equal(cached.logits(index, epoch), torch.from_numpy(want).transpose(0, 1))
    online = teachers.member_logits(next(FakeLoader(N).batches_at([index], view_epoch=1)).x)
    got = cached.logits(index, 1)
    top = online.topk(10, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), online.gather(-1, top), rtol=1e-3, atol=2e-2)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_reading_memory_does_not_grow_with_the_cache(tmp_path):
    large_n, cheap = 400_000, fake_teachers(num_classes=20, hidden=4)  # cheap to build on a busy CPU
    large = build_cache(cheap, FakeLoader(large_n), tmp_path, epochs=1, top_k=5, batch_size=8192)
    size = cache_bytes(large_n, 4, 20, top_k=5)  # 38 MB
    done = _run_helper("read", large, large_n)  # a fresh process: no memory freed by the build to reuse
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.split()[-1])
    assert grown < size / 4, f"reading a {size / 1e6:.0f} MB cache grew the process by {grown / 1e6:.1f} MB"


def test_ranks_write_their_parts_and_one_process_reads_them(whole, teachers, tmp_path):
    (tmp_path / "epoch_000.rank5.shard00000.index.npy").write_bytes(b"")  # of an older build on 6 ranks
    for rank in (0, 2, 1):  # rank 0 completes the cache only once every rank has finished
        build_cache(teachers, FakeLoader(N), tmp_path, rank=rank, world_size=3, **BUILD)
        with pytest.raises(FileNotFoundError, match="incomplete"):
            open_cache(tmp_path, teachers, FakeLoader(N))
        # rank r holds r, r+3, ...: 1000 of them, in shards of 512 rows
        assert json.loads((tmp_path / f"progress.rank{rank}.json").read_text())["rows"] == [[512, 488]] * 2
        assert np.array_equal(np.load(tmp_path / f"epoch_001.rank{rank}.shard00001.index.npy"),
                              np.arange(rank, N, 3)[512:])
    loader = FakeLoader(N)
    build_cache(teachers, loader, tmp_path, rank=0, world_size=3, **BUILD)  # run again: completes, computes nothing
    assert loader.yielded == 0
    assert not list(tmp_path.glob("*rank*"))  # every shard and record gathered and removed, the stale one too
    sharded, single = open_cache(tmp_path, teachers, FakeLoader(N)), open_cache(whole[0], teachers, FakeLoader(N))
    index = torch.randperm(N)[:500]
    for epoch in (0, 1):
        torch.testing.assert_close(sharded.logits(index, epoch), single.logits(index, epoch), rtol=1e-3, atol=2e-2)


def test_a_cache_of_the_old_format_is_refused_with_rebuild(whole, teachers, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(whole[0], old)
    manifest = json.loads((old / CACHE_MANIFEST).read_text())
    manifest["fingerprint"]["format"] = "ensemble-kd/teacher-cache/1"
    (old / CACHE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match=r"format ensemble-kd/teacher-cache/1 but this run uses format "
                                                 r"ensemble-kd/teacher-cache/2; rebuild it with"):
        open_cache(old, teachers, FakeLoader(N))


class _TrainOrderLoader(ShardedLoader):
    """A loader without batches_at: the cache reads it in its training order (drop_last loses some samples)."""

    def __init__(self, size: int, batch_size: int):
        super().__init__(size, batch_size=batch_size, train=True, seed=0, device="cpu", drop_last=None, rank=0,
                         world_size=1)
        self.views = FakeLoader(size)

    def fingerprint_data(self) -> dict:
        return self.views.fingerprint_data()

    def batches(self, epoch, start=0, view_epoch=None):
        return self.views.batches_at(self.batch_indices(epoch, start), epoch if view_epoch is None else view_epoch)


def test_a_loader_without_batches_at_is_cached_in_its_training_order(teachers, tmp_path):
    loader = _TrainOrderLoader(1000, 128)  # 7 full batches an epoch: 104 samples dropped
    cached = open_cache(build_cache(teachers, loader, tmp_path, epochs=2, shard_size=256), teachers, loader)
    assert json.loads((tmp_path / CACHE_MANIFEST).read_text())["missing"] == [104, 104]
    for epoch in (0, 1):
        for batch in loader.batches(epoch):
            torch.testing.assert_close(cached.logits(batch.index, epoch), teachers.member_logits(batch.x),
                                       rtol=1e-3, atol=2e-2)
    dropped = sorted(set(range(1000)) - set(torch.cat([b.index for b in loader.batches(0)]).tolist()))[0]
    with pytest.raises(ValueError, match=f"holds no logits for sample {dropped} of view epoch 0: the loader"):
        cached.logits(torch.tensor([3, dropped]), 0)
