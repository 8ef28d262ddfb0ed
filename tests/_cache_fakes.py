"""A loader that holds no data (like a streaming one) and cheap teachers: teacher caches of any size, fast.

Used by tests/test_cache_scale.py, in-process and from a subprocess that is killed mid-build.
"""

import hashlib
import os
import signal

import torch
from torch import nn

from ensemble_kd.data import Batch
from ensemble_kd.ensemble import TeacherSet


class FakeLoader:
    """The view of (seed, epoch, index) is the 2 numbers (index / size, epoch + seed): a pure function of them."""

    train, device, rank, world_size = True, torch.device("cpu"), 0, 1

    def __init__(self, size: int, batch_size: int = 256, seed: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.yielded = 0

    def fingerprint_data(self) -> dict:
        return {"num_samples": self.size, "hash": hashlib.blake2b(str(self.size).encode(), digest_size=8).hexdigest()}

    def batches_at(self, index_batches, view_epoch):
        for idx in index_batches:
            x = torch.stack([idx.double() / self.size, torch.full_like(idx, view_epoch + self.seed).double()], 1)
            self.yielded += 1
            yield Batch(x.float(), torch.zeros_like(idx), idx)


class KillingLoader(FakeLoader):
    """Dies after `after` batches: with SIGKILL (no cleanup runs at all) or with an exception."""

    def __init__(self, size: int, after: int, how: str = "exception", **kw):
        super().__init__(size, **kw)
        self.after, self.how = after, how

    def batches_at(self, index_batches, view_epoch):
        for batch in super().batches_at(index_batches, view_epoch):
            if self.yielded > self.after:
                if self.how == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("killed")
            yield batch


def fake_teachers(members: int = 4, num_classes: int = 100, hidden: int = 64) -> TeacherSet:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, num_classes)) for _ in range(members)]
    with torch.no_grad():
        for layer in layers:
            layer[2].weight.mul_(20)  # logits of a trained network's scale
    return TeacherSet(layers)


def anon_kb() -> int:
    """The process's resident anonymous memory (heap, not the page cache of mapped files), from /proc."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def read_cache(cache_dir: str, size: int) -> int:
    """Bytes of anonymous memory that opening a cache and reading 40 random batches from it adds."""
    import numpy as np

    from ensemble_kd.ensemble.cache import open_cache

    rng = np.random.default_rng(0)
    torch.zeros(512, 4, 100).scatter_(-1, torch.zeros(512, 4, 1, dtype=torch.int64), 1.0)  # warm torch's paths
    before = anon_kb()
    cached = open_cache(cache_dir, None, FakeLoader(size))
    for _ in range(40):
        cached.logits(torch.from_numpy(rng.integers(0, size, 512)), 0)
    return (anon_kb() - before) * 1024


if __name__ == "__main__":
    import sys

    from ensemble_kd.ensemble.cache import build_cache

    if sys.argv[1] == "read":  # python _cache_fakes.py read DIR SIZE: prints read_cache's bytes
        print(read_cache(sys.argv[2], int(sys.argv[3])))
    else:  # python _cache_fakes.py OUT_DIR AFTER: a build killed by SIGKILL after AFTER batches
        build_cache(fake_teachers(), KillingLoader(3000, int(sys.argv[2]), "sigkill"), sys.argv[1], epochs=2,
                    top_k=10, batch_size=256, shard_size=512)
