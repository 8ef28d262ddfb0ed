"""The teacher cache: cached logits equal online ones on the same views, the manifest refuses other runs."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_kd import pipeline
from ensemble_kd.cli import main
from ensemble_kd.config import load_config
from ensemble_kd.data import AugmentSpec, DeviceLoader, ImageDataset
from ensemble_kd.engine import save_model
from ensemble_kd.ensemble import TeacherSet, write_manifest
from ensemble_kd.ensemble.cache import CACHE_MANIFEST, CacheMismatchError, build_cache, open_cache
from ensemble_kd.methods import METHODS, Method, MethodLoss, Needs, register_method
from ensemble_kd.models import create

LOGITS = Needs(teacher_logits=True)
SEED = 7
FP16 = dict(rtol=1e-3, atol=1e-2)  # fp16 keeps 11 significant bits: ~5e-4 relative per logit


if "_test_soft" not in METHODS:
    @register_method("_test_soft")
    class _TestSoft(Method):
        """CE plus KL to the mean teacher probabilities at T=4: enough to train from teacher logits."""

        needs = Needs(teacher_logits=True)

        def loss(self, batch, student, teachers):
            target = teachers.logits.div(4).softmax(-1).mean(0)
            kl = F.kl_div(student.logits.div(4).log_softmax(-1), target, reduction="batchmean") * 16
            ce = F.cross_entropy(student.logits, batch.y)
            return MethodLoss(ce + kl, {"ce": ce.detach(), "kl": kl.detach()})


@pytest.fixture(scope="module")
def data():
    return pipeline.prepare_data(load_config(None, ["device=cpu"]))


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    members = [create("small_cnn", num_classes=10, in_channels=1, width=0.25),
               create("mlp", num_classes=10, in_channels=1)]
    with torch.no_grad():  # logits of a trained network's scale (tens), where fp16 rounding shows
        for m in members:
            [layer for layer in m.modules() if isinstance(layer, nn.Linear)][-1].weight.mul_(30)
    return TeacherSet(members)


@pytest.fixture(scope="module")
def loader(data):
    return data.train_loader(data.config.data, SEED)


@pytest.fixture(scope="module")
def cache16(teachers, loader, tmp_path_factory):
    return build_cache(teachers, loader, tmp_path_factory.mktemp("c16"), epochs=2, dataset="digits")


def _first_batches(loader, epoch, n=2):
    return [b for _, b in zip(range(n), loader.batches(epoch))]


def test_cached_logits_equal_online_on_shuffled_batches_and_wrapped_epochs(teachers, loader, cache16):
    cached = open_cache(cache16, teachers, loader, dataset="digits")
    assert len(cached) == 2 and cached.num_classes == 10 and cached.names == teachers.names
    for epoch in range(4):  # epochs 2 and 3 wrap onto the 2 cached ones
        assert cached.view_epoch(epoch) == epoch % 2
        for batch in _first_batches(loader, cached.view_epoch(epoch)):
            online = teachers.outputs(batch.x, LOGITS).logits
            got = cached.outputs(batch.x, LOGITS, index=batch.index, epoch=epoch)
            assert got.logits.dtype == torch.float32 and got.logits.shape == online.shape == (2, loader.batch_size, 10)
            assert got.taps == {}
            torch.testing.assert_close(got.logits, online, **FP16)
    assert teachers.outputs(batch.x, LOGITS).logits.abs().max() > 10  # the tolerance is tested at scale
    index = torch.arange(0, 1000, 7)
    assert not torch.allclose(cached.logits(index, 0), cached.logits(index, 1))  # each epoch its own views
    assert torch.equal(cached.logits(index, 4), cached.logits(index, 0))
    assert torch.equal(cached.logits(index, 3), cached.logits(index, 1))
    # A wrapped epoch must read the loader's views of epoch % E, not of the epoch itself.
    unwrapped = loader.batches(3).__next__()
    assert not torch.allclose(cached.outputs(unwrapped.x, LOGITS, index=unwrapped.index, epoch=3).logits,
                              teachers.outputs(unwrapped.x, LOGITS).logits, **FP16)


def test_float32_cache_is_the_online_logits(teachers, loader, tmp_path):
    cached = open_cache(build_cache(teachers, loader, tmp_path, epochs=1, dtype="float32"), teachers, loader)
    for batch in _first_batches(loader, 0):
        torch.testing.assert_close(cached.outputs(batch.x, LOGITS, index=batch.index, epoch=0).logits,
                                   teachers.outputs(batch.x, LOGITS).logits, rtol=1e-5, atol=1e-5)


def test_kd_loss_from_cached_logits_equals_the_online_loss(teachers, loader, cache16):
    cached = open_cache(cache16, teachers, loader)
    torch.manual_seed(1)
    for batch in _first_batches(loader, 1):
        student = torch.randn(len(batch.y), 10) * 5

        def kd(teacher_logits, t=4.0):
            target = teacher_logits.div(t).softmax(-1)  # (M, B, K): one KL per teacher, averaged
            return sum(F.kl_div(student.div(t).log_softmax(-1), p, reduction="batchmean") for p in target) * t * t

        online = kd(teachers.outputs(batch.x, LOGITS).logits)
        got = kd(cached.outputs(batch.x, LOGITS, index=batch.index, epoch=1).logits)
        torch.testing.assert_close(got, online, rtol=1e-3, atol=1e-4)


def _loader(data, dataset=None, **changes):
    kw = dict(batch_size=128, mean=data.splits.mean, std=data.splits.std, spec=data.splits.augment, seed=SEED)
    return DeviceLoader(dataset or data.splits.train, **{**kw, **changes})


def test_manifest_refuses_another_augmentation_seed_teachers_or_dataset(data, teachers, loader, cache16):
    def refused(match, teacher_arg=teachers, other_loader=loader, dataset="digits"):
        with pytest.raises(CacheMismatchError, match=match) as info:
            open_cache(cache16, teacher_arg, other_loader, dataset=dataset)
        message = str(info.value)
        assert message.startswith(f"cache '{cache16}' was made for ") and message.count(";") == 1
        assert message.endswith("rebuild it with `ensemble-kd cache-teachers`")

    refused("augmentation crop_padding=1 but this run uses crop_padding=2",
            other_loader=_loader(data, spec=AugmentSpec(crop_padding=2)))
    refused("augmentation flip=False but this run uses flip=True",
            other_loader=_loader(data, spec=AugmentSpec(crop_padding=1, flip=True)))
    refused("the views of loader seed 7 but this run uses seed 8", other_loader=_loader(data, seed=8))
    refused("normalisation mean=", other_loader=_loader(data, mean=(0.5,)))
    other = copy.deepcopy(teachers)
    with torch.no_grad():
        other.members[1].fc.weight[0, 0] += 1e-3  # one weight
    refused("teacher 1 .* with weights [0-9a-f]+ but this run uses weights", teacher_arg=other)
    refused("2 teachers but this run uses 1", teacher_arg=TeacherSet([teachers.members[0]]))
    train = data.splits.train
    images = train.images.clone()
    images[5, 0, 3, 3] ^= 1  # one pixel
    refused("dataset 'digits' .* but this run uses dataset 'digits'",
            other_loader=_loader(data, ImageDataset(images, train.labels, train.classes)))
    refused("dataset 'digits' .* but this run uses dataset 'other'", dataset="other")
    open_cache(cache16, None, loader)  # without teachers (distill loads none), the rest still matches


def test_cache_refuses_taps_and_perturbed_inputs(teachers, loader, cache16):
    with pytest.raises(ValueError, match="serves logits only"):
        open_cache(cache16, teachers, loader, needs=Needs(teacher_logits=True, teacher_taps=("layer1",)))
    cached = open_cache(cache16, teachers, loader)
    batch = next(loader.batches(0))
    with pytest.raises(ValueError, match="perturbs its inputs"):
        cached.outputs(batch.x, Needs(teacher_logits=True, perturbs_inputs=True), index=batch.index, epoch=0)
    with pytest.raises(ValueError, match="index=, epoch="):
        cached.outputs(batch.x, LOGITS)
    with pytest.raises(ValueError, match="eval-mode logits"):
        cached.outputs(batch.x, Needs(teacher_logits=True, teacher_bn="train"), index=batch.index, epoch=0)


def test_cache_serves_the_members_a_method_chose(teachers, loader, cache16):
    cached = open_cache(cache16, teachers, loader)
    batch = next(loader.batches(0))
    every = cached.outputs(batch.x, LOGITS, index=batch.index, epoch=0).logits
    chosen = cached.outputs(batch.x, LOGITS, index=batch.index, epoch=0, members=[1]).logits
    assert chosen.shape == (1, *every.shape[1:]) and torch.equal(chosen[0], every[1])


@pytest.mark.parametrize("dtype, tol", [("float32", dict(rtol=1e-5, atol=1e-6)), ("float16", dict(rtol=0, atol=1e-2))])
def test_top_k_keeps_the_top_k_probabilities_and_spreads_the_rest(teachers, loader, tmp_path, dtype, tol):
    k = 3
    cached = open_cache(build_cache(teachers, loader, tmp_path, epochs=1, dtype=dtype, top_k=k), teachers, loader)
    stored = {key: np.load(tmp_path / f"epoch_000.{key}.npy") for key in ("values", "classes")}
    assert stored["values"].shape == stored["classes"].shape == (len(loader.labels), 2, k)
    assert stored["values"].dtype == (np.float16 if dtype == "float16" else np.float32)
    assert stored["classes"].dtype == np.int16 and not list(tmp_path.glob("*.logits.npy"))
    batch = next(loader.batches(0))
    p = teachers.outputs(batch.x, LOGITS).logits.softmax(-1)
    q = cached.outputs(batch.x, LOGITS, index=batch.index, epoch=0).logits.softmax(-1)
    top = p.topk(k, dim=-1).indices
    torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), **tol)
    rest = torch.ones_like(q, dtype=torch.bool).scatter(-1, top, False)  # the other K - k classes
    expected = (1 - p.gather(-1, top).sum(-1, keepdim=True)) / (10 - k)  # share the remaining mass evenly
    torch.testing.assert_close(q[rest], expected.expand_as(q)[rest], **tol)
    with pytest.raises(ValueError, match="keeps every one of the 10 classes"):
        build_cache(teachers, loader, tmp_path / "all", epochs=1, top_k=10)


def test_shards_by_rank_assemble_into_the_whole_set(teachers, loader, cache16, tmp_path):
    build_cache(teachers, loader, tmp_path, epochs=2, rank=1, world_size=2)
    with pytest.raises(FileNotFoundError, match="no cache.json"):  # rank 0 writes the manifest
        open_cache(tmp_path, teachers, loader)
    n = len(loader.labels)
    index = np.load(tmp_path / "epoch_001.rank1.shard00000.index.npy")  # rank 1 computed its part alone
    assert index.dtype == np.int32 and np.array_equal(index, np.arange(1, n, 2))
    build_cache(teachers, loader, tmp_path, epochs=2, rank=0, world_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"] + [  # the shards, gathered and removed
        f"epoch_00{e}.{key}.npy" for e in (0, 1) for key in ("logits", "present")]
    whole, sharded = open_cache(cache16, teachers, loader), open_cache(tmp_path, teachers, loader)
    index = torch.randperm(n)[:300]
    for epoch in (0, 1):
        torch.testing.assert_close(sharded.logits(index, epoch), whole.logits(index, epoch), **FP16)
    (tmp_path / "epoch_001.logits.npy").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete: epoch_001.logits.npy is missing"):
        open_cache(tmp_path, teachers, loader)


# ---------------------------------------------------------------------------- end to end

TINY = ["device=cpu", "student.arch=mlp", "student.kwargs={hidden_sizes: [32]}", "student.seed=3",
        "data.batch_size=128", "eval.latency=false"]


@pytest.fixture(scope="module")
def teacher_run(teachers, tmp_path_factory):
    """A train-teachers run directory holding the (untrained) test teachers: training them adds nothing here."""
    run = tmp_path_factory.mktemp("teachers")
    entries = []
    for name, member in zip(["00-small_cnn", "01-mlp"], teachers.members):
        save_model(member, run / "members" / name / "model.pt")
        entries.append({"name": name, "spec": member.spec, "checkpoint": f"members/{name}/model.pt"})
    write_manifest(run, entries)
    return run


def test_cli_cache_teachers_then_distill_from_the_cache(teacher_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    build = ["cache-teachers", f"teachers.source={teacher_run}", "cache.epochs=2", *TINY]
    assert main([*build, f"cache.dir={cache}"]) == 0
    printed = capsys.readouterr()
    assert f"teacher cache: {cache}" in printed.out
    assert "cache: 1,213 images x 2 teachers x 2 epochs, all 10 logits fp16 -> 0.1 MB" in printed.err  # before it starts
    written = {p.name: p.read_bytes() for p in cache.glob("*.npy")}
    assert main(["cache-teachers", "--resume", str(cache)]) == 0  # its config.yaml: the same settings, nothing to do
    assert f"cache: {cache} is already built" in " ".join(capsys.readouterr().err.split())
    assert {p.name: p.read_bytes() for p in cache.glob("*.npy")} == written
    assert (cache / CACHE_MANIFEST).is_file() and (cache / "config.yaml").is_file()
    # teachers.source points nowhere: the distill run must not load any teacher.
    config = tmp_path / "distill.yaml"
    config.write_text("method: {name: _test_soft}\n")
    distill = ["distill", str(config), f"teachers.cache={cache}", "teachers.source=/nonexistent",
               "student.train.epochs=3", f"run.dir={tmp_path}", *TINY]
    assert main([*distill, "run.name=student"]) == 0
    results = json.loads((tmp_path / "student" / "results.json").read_text())
    assert results[0]["name"].startswith("student _test_soft") and 0 <= results[0]["acc"] <= 1
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train_kl" in r] == [1, 2, 3]
    capsys.readouterr()
    assert main([*distill, "run.name=other-seed", "student.seed=4"]) == 2  # the cache holds seed 3's views
    assert "the views of loader seed 3 but this run uses seed 4" in " ".join(capsys.readouterr().err.split())
    assert main([*build, f"cache.dir={teacher_run}"]) == 2  # never over a train-teachers run


def test_distill_from_a_cache_trains_the_same_student_as_online_teachers(teacher_run, tmp_path):
    config = load_config(None, TINY + [f"teachers.source={teacher_run}", "cache.dtype=float32", "cache.epochs=1",
                                       "method.name=_test_soft", "student.train.epochs=2"])
    data = pipeline.prepare_data(config)
    pipeline.cache_teachers(config, tmp_path / "cache", data=data)
    cached_config = config.model_copy(deep=True)
    cached_config.teachers.cache = str(tmp_path / "cache")
    cached, _ = pipeline.distill(cached_config, tmp_path / "cached", data=data)
    online_teachers = pipeline.load_teachers(config, data)
    online_teachers.view_epoch = lambda epoch: 0  # epoch 1 wraps onto the one cached epoch's views
    online, _ = pipeline.distill(config, tmp_path / "online", data=data, teachers=online_teachers)
    for key, value in online.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[key], value, rtol=1e-4, atol=1e-4, msg=key)
    # Methods that need what a cache cannot hold are refused before training.
    with pytest.raises(ValueError, match="serves logits only"):
        pipeline.open_teacher_cache(cached_config, data, Needs(teacher_logits=True, teacher_taps=("layer3",)))
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="not a finished teacher cache"):
        pipeline.distill(cached_config, tmp_path / "gone", data=data)
