"""Training from streamed images: the cache replays RandomResizedCrop + mixup views, a killed run with
loader workers resumes to the same weights, and two torchrun ranks end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data.samples import ImageFiles
from ensemble_kd.engine import Trainer
from ensemble_kd.engine.checkpoint import load_train_state
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.ensemble.cache import build_cache, open_cache
from ensemble_kd.methods import Needs, StudentOutput, create_method
from ensemble_kd.methods.ce import CrossEntropy
from ensemble_kd.models import create

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402

WORKER = Path(__file__).with_name("_ddp_worker.py")
MIXED = ["data.views.mixup_alpha=0.4", "data.views.cutmix_alpha=1.0", "data.views.mix_prob=0.8"]


def _overrides(root, *extra):
    return ["device=cpu", "data.name=image-folder", f"data.root={root}", "data.views.size=16", "data.batch_size=8",
            "data.eval_batch_size=16", "data.workers=2", "data.val_fraction=0.1", "teachers.count=2",
            "teachers.kwargs={width: 0.25}", "student.kwargs={width: 0.25}", "teachers.train.epochs=1",
            "student.train.epochs=1", "eval.latency=false", *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=("a", "b", "c", "d"), per_class=10,
                             test_per_class=3, sizes=(20, 48))


def test_cached_loss_equals_the_online_loss_on_resized_crops_with_mixup(folder, tmp_path):
    config = load_config(None, _overrides(folder, *MIXED))
    data = pipeline.prepare_data(config)
    assert isinstance(data.splits.train, ImageFiles)
    torch.manual_seed(0)
    teachers = TeacherSet([create("small_cnn", num_classes=4, in_channels=3, width=0.25) for _ in range(2)])
    loader = data.train_loader(config.data, config.student.seed)
    cache = build_cache(teachers, loader, tmp_path / "cache", epochs=2, dtype="float32", batch_size=5)
    cached = open_cache(cache, teachers, loader)
    method = create_method("aver")
    student = create("small_cnn", num_classes=4, in_channels=3, width=0.25).eval()
    needs = Needs(teacher_logits=True)
    mixed = 0
    for epoch in (0, 1, 2):  # epoch 2 wraps onto the views of epoch 0
        for batch in loader.batches(epoch, view_epoch=cached.view_epoch(epoch)):
            mixed += int((batch.target.max(1).values < 1).sum())
            out = StudentOutput(student(batch.x), {})
            online = method.loss(batch, out, teachers.outputs(batch.x, needs)).loss
            from_cache = method.loss(batch, out, cached.outputs(batch.x, needs, index=batch.index, epoch=epoch)).loss
            torch.testing.assert_close(from_cache, online, rtol=1e-5, atol=1e-6)
    assert mixed > 0
    # another mixing changes the pixels, and the cache refuses it
    other = data.train_loader(load_config(None, _overrides(folder)).data, config.student.seed)
    with pytest.raises(ValueError, match="mixup_alpha"):
        open_cache(cache, teachers, other)


class _Kill(CrossEntropy):
    def __init__(self, after):
        super().__init__()
        self.after, self.calls = after, 0

    def loss(self, batch, student, teachers=None):
        self.calls += 1
        if self.calls == self.after:
            raise RuntimeError("killed")  # a hard kill: only the periodic checkpoint survives
        return super().loss(batch, student, teachers)


def _trainer(data, config, out_dir, method):
    model = pipeline.build_model(config.teachers.resolved_members()[0], data)
    train = config.teachers.train.model_copy(update={"epochs": 2, "checkpoint_every": 2})
    return Trainer(model, method, data.train_loader(config.data, seed=0), train, out_dir, device=data.device, seed=0,
                   val_loader=data.val)


def test_a_run_killed_mid_epoch_with_loader_workers_resumes_to_the_same_weights(folder, tmp_path):
    config = load_config(None, _overrides(folder, *MIXED))
    data = pipeline.prepare_data(config)
    steps = len(data.train_loader(config.data, 0))
    reference = _trainer(data, config, tmp_path / "ref", create_method("ce")).fit()
    with pytest.raises(RuntimeError, match="killed"):
        _trainer(data, config, tmp_path / "run", _Kill(steps + 3)).fit()  # in epoch 2, after the step-(steps+2) save
    saved = load_train_state(tmp_path / "run" / "last.pt")
    assert 0 < saved["batch"] < steps and saved["epoch"] == 1  # mid-epoch
    resumed = _trainer(data, config, tmp_path / "run", create_method("ce"))
    model = resumed.fit(resume=True)
    ref, got = reference.state_dict(), model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_torchrun_distill_from_a_streamed_folder_ends_with_identical_weights(folder, tmp_path):
    overrides = _overrides(folder, *MIXED, "data.workers=1")
    teachers = tmp_path / "teachers"
    pipeline.train_teachers(load_config(None, overrides), teachers)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "distill", str(tmp_path), *overrides, "method.name=aver", f"teachers.source={teachers}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = len(pipeline.prepare_data(load_config(None, overrides)).splits.train)
    assert max(r.get("step", 0) for r in records) == (train + 1) // 2 // 8  # each rank half of every epoch
