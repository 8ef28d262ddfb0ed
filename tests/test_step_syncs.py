"""No forced host-device sync on a training step's path, for every method, online and from a teacher cache.

On a GPU each of these makes the host wait for the device: reading a value (`.item()`, `.tolist()`,
`bool(t)`, `float(t)`, formatting a tensor), copying to the host (`.cpu()`, `.numpy()`), and a copy
onto the device without `non_blocking=True` (PyTorch then waits for the stream). The CPU cannot tell
a host tensor from a device one, so the test counts, in our own code (torch's internals keep their
CPU-side step counts), every such call, and every `.to`/`copy_`/`torch.tensor`/`torch.as_tensor` aimed
at the trainer's device without non_blocking=True. It counts on the main thread (the loader's threads
and workers are host work) from the start of training to its end, except where the host is meant to
read: logging steps, the end of an epoch (its record, validation, checkpoint) and the first batch of
an epoch (the epoch's order and workers are set up there, once).
"""

from __future__ import annotations

import pickle
import sys
import threading
from pathlib import Path

import pytest
import torch

import ensemble_kd
from ensemble_kd import pipeline
from ensemble_kd.config import TrainConfig, load_config
from ensemble_kd.data import DeviceLoader, ImageDataset
from ensemble_kd.data.mixing import MixSpec
from ensemble_kd.data.views import AugmentSpec
from ensemble_kd.engine import Trainer
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.ensemble.cache import build_cache, open_cache
from ensemble_kd.methods import Needs, create_method
from ensemble_kd.models import create
from ensemble_kd.solvers import capped_simplex

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402

PACKAGE = str(Path(ensemble_kd.__file__).parent)
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")
CLASSES = 4


class SyncCounter:
    """Counts the calls that force a sync (see the module docstring), made by our code while `counting`."""

    def __init__(self, device: torch.device):
        self.device, self.counting, self.calls = device, False, []

    def _note(self, what: str) -> None:
        if not self.counting or threading.current_thread() is not threading.main_thread():
            return
        frame = sys._getframe(2)
        if frame.f_code.co_filename.startswith(PACKAGE):
            self.calls.append(f"{what} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")

    def _to_device(self, args, kwargs) -> bool:
        """Whether a .to(...) call names the trainer's device."""
        for a in (*args, kwargs.get("device")):
            if isinstance(a, (str, torch.device)):
                return torch.device(a).type == self.device.type
            if isinstance(a, torch.Tensor):
                return a.device.type == self.device.type
        return False

    def install(self, monkeypatch) -> None:
        counter = self
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(self, *args, _original=original, _name=name, **kwargs):
                counter._note(f"Tensor.{_name}")
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, read)
        to, copy_ = torch.Tensor.to, torch.Tensor.copy_

        def blocking_to(self, *args, **kwargs):
            if not kwargs.get("non_blocking", False) and counter._to_device(args, kwargs):
                counter._note("Tensor.to without non_blocking")
            return to(self, *args, **kwargs)

        def blocking_copy(self, src, non_blocking=False):
            if not non_blocking and self.device.type == counter.device.type:
                counter._note("Tensor.copy_ without non_blocking")
            return copy_(self, src, non_blocking=non_blocking)
        monkeypatch.setattr(torch.Tensor, "to", blocking_to)
        monkeypatch.setattr(torch.Tensor, "copy_", blocking_copy)
        for name in ("tensor", "as_tensor"):
            make = getattr(torch, name)

            def made(*args, _make=make, _name=name, **kwargs):
                if kwargs.get("device") is not None and counter._to_device((), kwargs):
                    counter._note(f"torch.{_name}(device=...)")
                return _make(*args, **kwargs)
            monkeypatch.setattr(torch, name, made)


def _paused(counter: SyncCounter, function):
    def run(*args, **kwargs):
        was, counter.counting = counter.counting, False
        try:
            return function(*args, **kwargs)
        finally:
            counter.counting = was
    return run


def count_syncs(trainer: Trainer, monkeypatch) -> list[str]:
    """The forced syncs of `trainer.fit()` outside logging steps, epoch ends and epoch starts."""
    counter = SyncCounter(trainer.device)
    for name in ("_log_step", "_end_epoch", "save", "_check_finite"):
        monkeypatch.setattr(trainer, name, _paused(counter, getattr(trainer, name)))
    batches = trainer.loader.batches

    def counted_batches(*args, **kwargs):  # the first batch of an epoch sets the epoch up: not counted
        it = iter(_paused(counter, batches)(*args, **kwargs))
        first = _paused(counter, next)(it, None)
        if first is None:
            return
        yield first
        for batch in it:
            yield batch
    monkeypatch.setattr(trainer.loader, "batches", counted_batches)
    counter.install(monkeypatch)
    counter.counting = True
    try:
        trainer.fit()
    finally:
        counter.counting = False
    return counter.calls


# ---------------------------------------------------------------------------- the runs

METHODS = {  # name: (options, can a cache serve it)
    "ce": ({}, False),
    "kd": ({}, True),
    "aver": ({}, True),
    # the device solve: what solver=auto picks where the Gram lies on a GPU (the host solve copies it out)
    "aekd": ({"solver": "device"}, True),
    "aekd-features": ({"solver": "device", "variant": "features"}, False),
    "meal": ({}, False),
    "meal-logits": ({"taps": ["logits"]}, True),
    "ensemblenet": ({"branches": 2}, False),
    "latentbe": ({}, True),
}


def _method(name: str):
    options, _ = METHODS[name]
    return create_method(name.split("-")[0], **options)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(48) % CLASSES, tuple("abcd"))


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return TeacherSet([create("small_cnn", num_classes=CLASSES, in_channels=3, width=0.25) for _ in range(2)])


def _device_loader(images):
    return DeviceLoader(images, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3, spec=AugmentSpec(2, True),
                        mix=MixSpec(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.8), seed=3)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("imgs"), classes=tuple("abcd"), per_class=6,
                             test_per_class=1, sizes=(12, 20))
    config = load_config(None, ["device=cpu", "data.name=image-folder", f"data.root={root}", "data.views.size=8",
                                "data.batch_size=8", "data.workers=1", "data.val_fraction=0.0",
                                "data.views.mixup_alpha=0.4", "data.views.cutmix_alpha=1.0"])
    data = pipeline.prepare_data(config)
    return lambda: data.train_loader(config.data, 3)


@pytest.fixture(scope="module")
def caches(images, teachers, stream, tmp_path_factory):
    """A top-k fp16 cache of the device loader's views, a full fp32 one of the streamed views."""
    root = tmp_path_factory.mktemp("caches")
    return {"device": build_cache(teachers, _device_loader(images), root / "device", epochs=1, top_k=2),
            "stream": build_cache(teachers, stream(), root / "stream", epochs=1, dtype="float32")}


def _trainer(method_name, loader, teachers, out_dir):
    method = _method(method_name)
    arch, kwargs = method.student_spec("small_cnn", {"width": 0.25}, len(teachers))
    torch.manual_seed(0)
    model = create(arch, num_classes=CLASSES, in_channels=3, **kwargs)
    train = TrainConfig(epochs=2, log_every=3, checkpoint_every=0)
    return Trainer(model, method, loader, train, out_dir, device=torch.device("cpu"), seed=0,
                   teachers=teachers if method.needs.teachers else None)


# a cache holds logits only: it serves the methods that need no teacher taps (and some teachers)
CASES = [(m, source) for m, (_, cacheable) in METHODS.items() for source in ("online", "cached")[:1 + cacheable]]


@pytest.mark.parametrize("method, source", CASES)
@pytest.mark.parametrize("data", ["device", "stream"])
def test_no_forced_sync_outside_logging_steps(method, source, data, images, teachers, stream, caches, tmp_path,
                                              monkeypatch):
    loader = _device_loader(images) if data == "device" else stream()
    if source == "cached":
        teachers = open_cache(caches[data], teachers, loader)
    trainer = _trainer(method, loader, teachers, tmp_path)
    calls = count_syncs(trainer, monkeypatch)
    assert trainer.pos.step == 2 * len(loader) > 3  # steps outside logging ones ran
    assert not calls, "forced syncs:\n" + "\n".join(sorted(set(calls)))


# ---------------------------------------------------------------------------- rows shipped with the batch

@pytest.mark.parametrize("data", ["device", "stream"])
def test_rows_shipped_with_a_batch_give_the_logits_of_a_lookup(data, images, stream, teachers, caches):
    loader = _device_loader(images) if data == "device" else stream()
    cached = open_cache(caches[data], teachers, loader)
    needs = Needs(teacher_logits=True)
    seen = 0
    for epoch in (0, 1):  # epoch 1 wraps onto the views of epoch 0
        for batch in loader.batches(epoch, view_epoch=cached.view_epoch(epoch), rows=cached.row_source()):
            for members in (None, [1, 0], [1]):
                shipped = cached.outputs(batch.x, needs, rows=batch.teacher_rows, members=members).logits
                looked_up = cached.outputs(batch.x, needs, index=batch.index, epoch=epoch, members=members).logits
                assert torch.equal(shipped, looked_up)
            seen += len(batch.index)
    assert seen == 2 * len(loader) * loader.batch_size


def test_training_on_shipped_rows_ends_with_the_weights_of_lookups(images, teachers, caches, tmp_path):
    def run(ships: bool, out):
        loader = _device_loader(images)
        loader.ships_teacher_rows = ships
        trainer = _trainer("aver", loader, open_cache(caches["device"], teachers, loader), out)
        assert (trainer.cache_rows is not None) == ships
        return trainer.fit()
    shipped, looked_up = run(True, tmp_path / "a").state_dict(), run(False, tmp_path / "b").state_dict()
    assert all(torch.equal(shipped[k], looked_up[k]) for k in shipped)


def test_a_row_source_pickles_without_the_cache_arrays(images, teachers, caches):
    cached = open_cache(caches["device"], teachers, _device_loader(images))
    source = cached.row_source()
    cached.rows(torch.arange(4), 0)  # the maps are open
    received = pickle.loads(pickle.dumps(source))
    assert all(not hasattr(reader, "arrays") for reader in received.readers)  # reopened where it lands, on use
    index = torch.tensor([5, 0, 47, 5])
    for key, rows in received(index, 0).items():
        assert torch.equal(rows, cached.rows(index, 0)[key])


def test_auto_solver_solves_on_the_device_off_the_cpu():
    assert capped_simplex._resolve("auto", torch.eye(2)) == "host"
    assert capped_simplex._resolve("auto", torch.empty(2, 2, device="meta")) == "device"
    assert capped_simplex._resolve("host", torch.empty(2, 2, device="meta")) == "host"


def test_a_run_on_shipped_rows_killed_mid_epoch_resumes_to_the_same_weights(images, teachers, caches, tmp_path):
    def trainer(out):
        loader = _device_loader(images)
        return _trainer("aver", loader, open_cache(caches["device"], teachers, loader), out)
    reference = trainer(tmp_path / "ref").fit().state_dict()
    killed = trainer(tmp_path / "run")
    killed.cfg = killed.cfg.model_copy(update={"checkpoint_every": 2})
    loss = killed.method.loss
    calls = []

    def dying(*args):
        calls.append(1)
        if len(calls) == 9:  # step 9 of 12: epoch 2, after the checkpoint of step 8
            raise RuntimeError("killed")
        return loss(*args)
    killed.method.loss = dying
    with pytest.raises(RuntimeError, match="killed"):
        killed.fit()
    resumed = trainer(tmp_path / "run")
    assert resumed.fit(resume=True) is resumed.model and resumed.pos.step == 12
    got = resumed.model.state_dict()
    assert all(torch.equal(got[k], reference[k]) for k in reference)
