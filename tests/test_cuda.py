"""The CUDA path itself: skipped without a GPU, run by benchmarks/gpu_check.py where there is one."""

import sys
from pathlib import Path

import pytest
import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.engine import Trainer
from ensemble_kd.engine.checkpoint import atomic_save, load_train_state
from ensemble_kd.methods import Needs, create_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["device=cuda", "teachers.train.epochs=1", "data.batch_size=128", "teachers.kwargs={}",
        "teachers.arch=resnet20", "teachers.count=2"]


@pytest.fixture(scope="module")
def data():
    return pipeline.prepare_data(load_config(None, TINY))


def _trainer(data, out_dir, *options, method="ce", teachers=None):
    config = load_config(None, TINY + list(options))
    model = pipeline.build_model(config.teachers.resolved_members()[0], data)
    return Trainer(model, create_method(method), data.train_loader(config.data, seed=0), config.teachers.train,
                   out_dir, device=data.device, seed=0, val_loader=data.val, teachers=teachers)


def _finite(model) -> bool:
    return all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_bf16_channels_last_training_on_the_gpu(data, tmp_path):
    trainer = _trainer(data, tmp_path)
    assert trainer.autocast_dtype == torch.bfloat16 and trainer.channels_last and not trainer.scaler.is_enabled()
    assert torch.backends.cudnn.benchmark
    model = trainer.fit()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and _finite(model)
    record = load_train_state(tmp_path / "last.pt")
    assert record["step"] == trainer.steps_per_epoch


def test_fp16_with_a_grad_scaler_on_the_gpu(data, tmp_path):
    trainer = _trainer(data, tmp_path, "teachers.train.precision=fp16")
    assert trainer.autocast_dtype == torch.float16 and trainer.scaler.is_enabled()
    assert _finite(trainer.fit())
    assert load_train_state(tmp_path / "last.pt")["scaler"]["scale"] == trainer.scaler.get_scale()


def test_a_run_saved_on_8_gpus_resumes_on_this_one_with_rank_0s_state(data, tmp_path):
    _trainer(data, tmp_path).fit()
    state = load_train_state(tmp_path / "last.pt")
    per_rank = []
    for r in range(8):
        torch.cuda.manual_seed(1000 + r)
        per_rank.append(torch.cuda.get_rng_state())
    state["rng"]["cuda_by_rank"] = per_rank
    atomic_save(state, tmp_path / "last.pt")
    _trainer(data, tmp_path).fit(resume=True)  # finished: nothing draws after the restore
    assert torch.equal(torch.cuda.get_rng_state(), per_rank[0])


def test_streamed_batches_come_pinned_and_non_blocking_to_the_gpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from _images import make_image_folder

    root = make_image_folder(tmp_path)
    common = ["data.views.size=16", "data.batch_size=6", "data.val_fraction=0", "data.workers=2",
              "data.name=image-folder", f"data.root={root}"]
    on_gpu = pipeline.prepare_data(load_config(None, ["device=cuda", *common]))
    on_cpu = pipeline.prepare_data(load_config(None, ["device=cpu", *common]))
    config = load_config(None, ["device=cuda", *common])
    gpu_batches = list(on_gpu.train_loader(config.data, seed=0).batches(0))
    cpu_batches = list(on_cpu.train_loader(config.data, seed=0).batches(0))
    assert gpu_batches[0].x.is_cuda and gpu_batches[0].index.is_cuda
    for g, c in zip(gpu_batches, cpu_batches):
        torch.testing.assert_close(g.x.cpu(), c.x)
        assert torch.equal(g.y.cpu(), c.y)


def test_a_compiled_student_trains_like_the_eager_one(data, tmp_path):
    eager = _trainer(data, tmp_path / "eager", "teachers.train.precision=fp32")
    compiled = _trainer(data, tmp_path / "compiled", "teachers.train.precision=fp32", "teachers.train.compile=true")
    batch = next(iter(eager.loader.batches(0)))
    loss_e, _ = eager._step(batch)
    loss_c, _ = compiled._step(batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=1e-3)
    for (k, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=k)


def test_cached_teachers_serve_the_online_teachers_logits(tmp_path):
    config = load_config(None, TINY)
    data = pipeline.prepare_data(config)
    members = [pipeline.build_model(m, data) for m in config.teachers.resolved_members()]
    from ensemble_kd.ensemble import TeacherSet

    online = TeacherSet(members).prepare_for_inference()
    cache = pipeline.cache_teachers(config.model_copy(update={"cache": config.cache.model_copy(update={"epochs": 1})}),
                                    tmp_path / "cache", data=data, teachers=online)
    cached_config = load_config(None, [*TINY, f"teachers.cache={cache}"])
    cached = pipeline.open_teacher_cache(cached_config, data)
    loader = data.train_loader(config.data, config.student.seed)
    for batch in loader.batches(0):
        got = cached.outputs(batch.x, Needs(teacher_logits=True), index=batch.index, epoch=0).logits
        torch.testing.assert_close(got.float(), online.member_logits(batch.x), rtol=2e-2, atol=2e-2)
