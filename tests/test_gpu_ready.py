"""What the CUDA path decides, checked on the CPU by faking torch.cuda: per-rank RNG states,
the precision a GPU gets, the control group for long waits, the compile option."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ensemble_kd import distributed, pipeline, precision
from ensemble_kd.config import load_config
from ensemble_kd.engine import Trainer
from ensemble_kd.engine.checkpoint import load_train_state
from ensemble_kd.engine.seeding import rng_state, set_rng_state
from ensemble_kd.methods import create_method
from ensemble_kd.methods.ce import CrossEntropy

SRC = Path(__file__).resolve().parents[1] / "src" / "ensemble_kd"
TINY = ["teachers.train.epochs=1", "data.batch_size=128", "teachers.kwargs={width: 0.25}", "device=cpu"]


class FakeCuda:
    """torch.cuda as a process on `device` of `count` GPUs sees it: one RNG state per device."""

    def __init__(self, monkeypatch, device=0, count=8):
        self.states = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(count)}
        self.device, self.count = device, count
        self.set_calls: list[tuple[int, torch.Tensor]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[d] for d in range(self.count)])

    def _index(self, device):
        if device is None or device == "cuda":
            return self.device
        return device.index if isinstance(device, torch.device) else int(device)

    def _set(self, state, device="cuda"):
        index = self._index(device)
        if index >= self.count:
            raise IndexError(f"no GPU {index}")  # what a real resume on fewer GPUs met
        self.set_calls.append((index, state.clone()))


def _saved_by_ranks(n):
    """A state as rank 0 of an n-GPU run writes it: each rank's own device's state, by rank."""
    return {**rng_state(), "cuda_by_rank": [torch.full((16,), 100 + r, dtype=torch.uint8) for r in range(n)]}


def test_one_process_saves_only_its_own_devices_state(monkeypatch):
    FakeCuda(monkeypatch, device=3, count=8)
    saved = rng_state()
    assert [s.tolist() for s in saved["cuda_by_rank"]] == [[3] * 16]
    assert "cuda" not in saved


@pytest.mark.parametrize("ranks_now", [1, 4, 8])
def test_saved_on_8_resumes_on_fewer_with_each_rank_its_own_state(monkeypatch, ranks_now):
    state = _saved_by_ranks(8)
    for rank in range(ranks_now):
        cuda = FakeCuda(monkeypatch, device=0 if ranks_now == 1 else rank, count=ranks_now)  # CUDA_VISIBLE_DEVICES=0
        set_rng_state(state, rank)
        assert len(cuda.set_calls) == 1
        device, restored = cuda.set_calls[0]
        assert device == cuda.device and restored.tolist() == [100 + rank] * 16


def test_a_rank_the_saved_run_did_not_have_keeps_its_seeded_state(monkeypatch):
    cuda = FakeCuda(monkeypatch, device=1, count=2)
    set_rng_state(_saved_by_ranks(1), rank=1)
    assert cuda.set_calls == []


def test_old_checkpoints_restore_their_entry_for_this_device_only(monkeypatch):
    cuda = FakeCuda(monkeypatch, device=0, count=1)
    old = {**rng_state(), "cuda": [torch.full((16,), 50 + d, dtype=torch.uint8) for d in range(8)]}
    old.pop("cuda_by_rank")
    set_rng_state(old, rank=0)  # before: set_rng_state_all over 8 states on 1 GPU raised IndexError
    assert [(d, s.tolist()) for d, s in cuda.set_calls] == [(0, [50] * 16)]


@pytest.fixture(scope="module")
def data():
    return pipeline.prepare_data(load_config(None, TINY))


def _trainer(data, out_dir, *options, method="ce"):
    config = load_config(None, TINY + list(options))
    model = pipeline.build_model(config.teachers.resolved_members()[0], data)
    return Trainer(model, create_method(method), data.train_loader(config.data, seed=0), config.teachers.train,
                   out_dir, device=data.device, seed=0, val_loader=data.val)


def test_the_trainers_checkpoint_holds_this_devices_state_and_resume_restores_it(monkeypatch, data, tmp_path):
    cuda = FakeCuda(monkeypatch, device=0, count=1)
    _trainer(data, tmp_path).fit()
    saved = load_train_state(tmp_path / "last.pt")["rng"]["cuda_by_rank"]
    assert [s.tolist() for s in saved] == [[0] * 16]
    _trainer(data, tmp_path).fit(resume=True)
    assert [(d, s.tolist()) for d, s in cuda.set_calls] == [(0, [0] * 16)]


# ---------------------------------------------------------------------------- precision
@pytest.mark.parametrize("capability, want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.resolve("auto", torch.device("cuda", 0)) == want
    assert precision.autocast_dtype("auto", torch.device("cuda", 0)) == precision.DTYPES[want]
    assert precision.resolve("bf16", torch.device("cuda", 0)) == "bf16"  # asked for: kept


def test_auto_precision_on_the_cpu_is_fp32():
    assert precision.autocast_dtype("auto", torch.device("cpu")) is None


class KilledInEpoch2(CrossEntropy):
    """Cross-entropy that dies (no chance to save) in the second epoch's first step."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.calls, self.steps_per_epoch = 0, steps_per_epoch

    def loss(self, batch, student, teachers=None):
        self.calls += 1
        if self.calls > self.steps_per_epoch:
            raise RuntimeError("killed")
        return super().loss(batch, student, teachers)


def test_fp16_trains_with_a_grad_scaler_whose_state_resumes_exactly(data, tmp_path):
    fp16 = ["teachers.train.precision=fp16", "teachers.train.epochs=2"]
    reference = _trainer(data, tmp_path / "ref", *fp16)
    assert reference.scaler.is_enabled() and reference.autocast_dtype == torch.float16
    reference.fit()
    killed = _trainer(data, tmp_path / "run", *fp16)
    killed.method = KilledInEpoch2(killed.steps_per_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        killed.fit()
    saved = load_train_state(tmp_path / "run" / "last.pt")
    assert saved["epoch"] == 1 and saved["scaler"]["_growth_tracker"] == killed.steps_per_epoch  # no overflow yet
    resumed = _trainer(data, tmp_path / "run", *fp16)
    resumed.fit(resume=True)
    assert resumed.scaler.state_dict() == reference.scaler.state_dict()
    ref, got = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_cpu_run_leaves_cudnn_benchmark_alone(monkeypatch, data, tmp_path):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _trainer(data, tmp_path)
    assert torch.backends.cudnn.benchmark is False


# ---------------------------------------------------------------------------- compile
def test_compile_option_compiles_the_training_forward(monkeypatch, data, tmp_path):
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return module  # eager stands in for the compiled graph: the plumbing is under test

    monkeypatch.setattr(torch, "compile", fake_compile)
    _trainer(data, tmp_path / "eager")
    assert compiled == []
    trainer = _trainer(data, tmp_path / "compiled", "teachers.train.compile=true")
    assert compiled == [trainer.model]


# ---------------------------------------------------------------------------- long waits on gloo
@pytest.mark.parametrize("call, name", [(distributed.barrier, "barrier"),
                                        (lambda: distributed.broadcast_object(1), "broadcast_object_list"),
                                        (lambda: distributed.all_gather_object(1), "all_gather_object")])
def test_host_side_collectives_use_the_control_group(monkeypatch, call, name):
    control = object()
    seen = []
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2, 0))
    monkeypatch.setattr(distributed, "_control_group", control)
    monkeypatch.setattr(dist, name, lambda *args, group=None, **kwargs: seen.append(group))
    call()
    assert seen == [control]


def test_no_module_waits_on_the_default_group_directly():
    """Waits go through distributed.barrier (the control group): a bare dist.barrier() would be NCCL's."""
    pattern = re.compile(r"(dist|torch\.distributed)\.(barrier|broadcast_object_list|all_gather_object)\(")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") for i, line in
                 enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and "group=control_group()" not in line]
    assert offenders == []


# ---------------------------------------------------------------------------- sharded validation
def test_under_torchrun_each_rank_validates_only_its_shard(monkeypatch, data, tmp_path):
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(1, 2, 0))
    monkeypatch.setattr(Trainer, "_wrap_distributed", lambda self, model: model)  # no process group here
    trainer = _trainer(data, tmp_path)
    mine = trainer.val_loader.indices(None).tolist()
    assert mine == list(range(1, data.val.size, 2))
    assert data.val.indices(None).tolist() == list(range(data.val.size))  # the split itself is left whole


# ---------------------------------------------------------------------------- persistent stream workers
def test_stream_workers_persist_over_epochs_and_views_stay_a_function_of_seed_epoch_index(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _images import make_image_folder

    config = load_config(None, ["device=cpu", "data.views.size=16", "data.batch_size=6", "data.val_fraction=0",
                                "data.name=image-folder", f"data.root={make_image_folder(tmp_path)}"])
    data = pipeline.prepare_data(config.model_copy(update={"data": config.data.model_copy(update={"workers": 0})}))

    def loader(workers):
        return data.train_loader(config.data.model_copy(update={"workers": workers}), seed=0)

    def epoch(l, e, start=0):
        return torch.cat([b.x for b in l.batches(e, start=start)])

    fresh, kept = loader(0), loader(2)
    next(iter(kept.batches(0)))  # a pass dropped after one batch (the trainer's bind does this)
    assert torch.equal(epoch(kept, 0), epoch(fresh, 0))
    workers = [w.pid for w in kept._pool._iterator._workers]
    assert torch.equal(epoch(kept, 1), epoch(fresh, 1)) and torch.equal(epoch(kept, 1, start=1), epoch(fresh, 1, start=1))
    assert [w.pid for w in kept._pool._iterator._workers] == workers  # the same processes served every epoch
    first, second = kept.batches(0), kept.batches(1)
    next(first), next(second)
    with pytest.raises(RuntimeError, match="second pass"):
        next(first)


class WithOwnOptimizers(CrossEntropy):
    """Cross-entropy times a learned scale with an optimizer of its own, and an idle parameter with
    another (no gradient ever reaches it)."""

    def __init__(self):
        super().__init__()
        self.scale, self.idle = torch.nn.Parameter(torch.ones(())), torch.nn.Parameter(torch.ones(()))
        self.optimizers = [torch.optim.SGD([self.scale], lr=0.1), torch.optim.SGD([self.idle], lr=0.1)]

    def param_groups(self):
        return []

    def extra_optimizers(self):
        return self.optimizers

    def loss(self, batch, student, teachers=None):
        out = super().loss(batch, student, teachers)
        return dataclasses.replace(out, loss=out.loss * self.scale)


def test_fp16_steps_a_methods_own_optimizers_through_the_scaler(data, tmp_path):
    trainer = _trainer(data, tmp_path, "teachers.train.precision=fp16", "teachers.train.grad_clip=5")
    trainer.method = method = WithOwnOptimizers()
    trainer.fit()
    assert trainer.scaler.state_dict()["_growth_tracker"] == trainer.steps_per_epoch  # every step taken
    assert method.scale.item() != 1.0 and method.idle.item() == 1.0


@pytest.mark.parametrize("device, backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_the_control_group_is_gloo_with_a_timeout_of_hours(monkeypatch, device, backend):
    made = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: made.update(default=backend))
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.update(control=kwargs) or "control")
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2, 0))
    monkeypatch.setattr(distributed, "_control_group", None)
    distributed.init_from_env(device)
    assert made["default"] == backend and made["control"]["backend"] == "gloo"
    assert made["control"]["timeout"].total_seconds() >= 6 * 3600
    assert distributed.control_group() == "control"


def test_compiled_teachers_compile_their_taps_too(monkeypatch):
    """teachers.compile with a method that reads block taps: the tapped forward is compiled (dynamo traces
    the hooks; the eager backend stands in for inductor here) and gives the eager taps."""
    from ensemble_kd.ensemble import TeacherSet
    from ensemble_kd.methods import Needs
    from ensemble_kd.models import create, forward_with_taps

    real_compile, compiled = torch.compile, []

    def eager_backend(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_backend)
    torch.manual_seed(0)
    members = [create("small_cnn", num_classes=10, width=0.25).eval() for _ in range(2)]
    fast = TeacherSet(members).prepare_for_inference(compile=True, fold_bn=False)
    x = torch.randn(4, 3, 32, 32)
    needs = Needs(teacher_logits=True, teacher_taps=("layer1", "layer2"))
    got = fast.outputs(x, needs)
    assert len(compiled) == 2 + 2  # the members, then each member's tapped forward
    fast.outputs(x, needs)
    assert len(compiled) == 4  # compiled once, reused
    for i, member in enumerate(members):
        logits, taps = forward_with_taps(member, x, ("layer1", "layer2"))
        torch.testing.assert_close(got.logits[i], logits)
        for name in taps:
            torch.testing.assert_close(got.taps[name][i], taps[name])
