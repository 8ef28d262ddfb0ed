"""torchrun with 2 CPU processes (gloo): the same weights on both ranks, rank 0 alone writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.methods import Needs, create_method

WORKER = Path(__file__).with_name("_ddp_worker.py")
TINY = ["teachers.count=2", "teachers.train.epochs=1", "teachers.kwargs={width: 0.25}",
        "student.kwargs={width: 0.25}", "student.train.epochs=1", "data.batch_size=128", "device=cpu"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("teachers")
    config = load_config(None, TINY)
    pipeline.train_teachers(config, run)
    return run


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("method", ["aver", "aekd", "meal", "ensemblenet", "latentbe"])
def test_torchrun_distill_ends_with_identical_weights_on_both_ranks(teacher_run, tmp_path, method):
    torchrun("distill", str(tmp_path), *TINY, f"method.name={method}", f"teachers.source={teacher_run}")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # each rank saw half of the 1213 training images per epoch: 607 -> 4 batches of 128 with drop_last
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 607 // 128
    assert (run / "model.pt").is_file()
    student = load_config(None, TINY).student
    arch, kwargs = create_method(method).student_spec(student.arch, student.kwargs, 2)  # multi-headed, BE, or plain
    trained = pipeline.build_model(student.model_copy(update={"arch": arch, "kwargs": kwargs}),
                                   pipeline.prepare_data(load_config(None, TINY)))
    assert not all(torch.equal(trained.state_dict()[k], rank0[k]) for k in rank0)  # it did train
    # each rank validated its half of the split; the gathered figures are the whole split's
    trained.load_state_dict(rank0)
    trained.eval()
    val = pipeline.prepare_data(load_config(None, TINY)).val
    with torch.no_grad():
        logits = torch.cat([trained(b.x) for b in val.batches(0)]).double()
        labels = torch.cat([b.y for b in val.batches(0)])
    assert records[-1]["val_acc"] == (logits.argmax(1) == labels).double().mean().item()
    assert records[-1]["val_nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_torchrun_cache_is_written_by_rank_and_serves_every_index(teacher_run, tmp_path):
    torchrun("cache", str(tmp_path), *TINY, f"teachers.source={teacher_run}", "cache.epochs=2")
    cache_dir = tmp_path / "cache"
    assert json.loads((cache_dir / "cache.json").read_text())["world_size"] == 2  # each rank computed its part
    assert not list(cache_dir.glob("*.rank*"))  # gathered into one array per epoch and key
    config = load_config(None, [*TINY, f"teachers.source={teacher_run}", f"teachers.cache={cache_dir}"])
    data = pipeline.prepare_data(config)
    cached = pipeline.open_teacher_cache(config, data)
    online = pipeline.load_teachers(config, data)
    loader = data.train_loader(config.data, config.student.seed)
    for epoch in (0, 1):
        for batch in loader.batches(epoch):  # every index of both ranks' shards, in one process
            got = cached.outputs(batch.x, Needs(teacher_logits=True), index=batch.index, epoch=epoch).logits
            want = online.member_logits(batch.x)
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(teacher_run, tmp_path):
    """SIGTERM reaches rank 1 alone during step 3: both ranks save after step 3 and stop (before,
    rank 0 went on into step 4's all-reduce and waited for ever)."""
    common = [*TINY, "method.name=aver", f"teachers.source={teacher_run}", "data.batch_size=32"]
    torchrun("distill-signalled", str(tmp_path), *common, timeout=240)
    stopped = [json.loads((tmp_path / f"stopped{r}.json").read_text()) for r in (0, 1)]
    assert stopped[0] == stopped[1] and stopped[0][-1] == 3, stopped
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 3  # rank 0 wrote it


def test_rank_0_indexes_the_tar_shards_and_the_other_ranks_read_its_index(tmp_path):
    """On a cold index cache every rank used to walk every shard at once; now rank 0 alone does."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _images import make_tar_shards

    root = make_tar_shards(tmp_path / "shards", num_classes=3, per_shard=6, shards=3)  # new files: a cold cache
    torchrun("prepare", str(tmp_path), "data.name=tar-shards", f"data.root={root}", "data.views.size=16",
             "data.workers=0")
    prepared = [json.loads((tmp_path / f"prepared{r}.json").read_text()) for r in (0, 1)]
    assert len(prepared[0]["built"]) == 4 and prepared[1]["built"] == []  # 3 train shards + 1 test shard
    assert prepared[0]["digest"] == prepared[1]["digest"]
