"""The training loop: resume equality, non-finite loss, checkpoints, the teacher set."""

import json
import os
import signal

import pytest
import torch
from torch import nn

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.engine import CheckpointError, NonFiniteLossError, Trainer, load_model, save_model
from ensemble_kd.engine.checkpoint import atomic_save, load_train_state
from ensemble_kd.ensemble import TeacherSet, majority_vote
from ensemble_kd.methods import Method, MethodLoss, create_method
from ensemble_kd.methods.ce import CrossEntropy
from ensemble_kd.models import create

TINY = ["teachers.train.epochs=2", "teachers.train.checkpoint_every=4", "teachers.train.log_every=3", "data.batch_size=128",
        "student.kwargs={width: 0.25}", "teachers.kwargs={width: 0.25}"]


@pytest.fixture(scope="module")
def data():
    return pipeline.prepare_data(load_config(None, TINY + ["device=cpu"]))


def _trainer(data, out_dir, method=None, epochs=2):
    config = load_config(None, TINY + [f"teachers.train.epochs={epochs}"])
    member = config.teachers.resolved_members()[0]
    model = pipeline.build_model(member, data)
    return Trainer(model, method or create_method("ce"), data.train_loader(data.config.data, seed=0), config.teachers.train,
                   out_dir, device=data.device, seed=0, val_loader=data.val)


class Interrupt(CrossEntropy):
    """Cross-entropy that, at call `after`, sends Ctrl-C to its own process or dies at once."""

    def __init__(self, after, error=KeyboardInterrupt):
        super().__init__()
        self.after, self.calls, self.error = after, 0, error

    def loss(self, batch, student, teachers=None):
        self.calls += 1
        if self.calls == self.after:
            if self.error is KeyboardInterrupt:
                os.kill(os.getpid(), signal.SIGINT)  # the trainer finishes this step, saves, stops
            else:
                raise self.error("killed")  # a hard kill: no chance to save
        return super().loss(batch, student, teachers)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("error, after", [(KeyboardInterrupt, 13), (RuntimeError, 6)])
def test_resume_ends_with_the_same_weights(data, tmp_path, error, after):
    reference = _trainer(data, tmp_path / "ref").fit()
    # 9 batches per epoch: Ctrl-C during step 13 saves after it (mid-epoch 2); a hard kill in
    # step 6 leaves only the periodic checkpoint of step 4 behind.
    with pytest.raises(error):
        _trainer(data, tmp_path / "run", method=Interrupt(after, error)).fit()
    saved = load_train_state(tmp_path / "run" / "last.pt")
    assert saved["step"] == (after if error is KeyboardInterrupt else 4)
    resumed = _trainer(data, tmp_path / "run")
    model = resumed.fit(resume=True)
    assert resumed.pos.step == 2 * len(data.train_loader(data.config.data, 0))
    assert _same_weights(model, reference)


def test_resume_of_a_finished_run_changes_nothing(data, tmp_path):
    first = _trainer(data, tmp_path, epochs=1).fit()
    again = _trainer(data, tmp_path, epochs=1)
    again.fit(resume=True)
    assert _same_weights(first, again.model)


class Explodes(CrossEntropy):
    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, batch, student, teachers=None):
        self.calls += 1
        out = super().loss(batch, student, teachers)
        if self.calls == self.at:
            return MethodLoss(out.loss * float("nan"), {"ce": out.loss.detach(), "bad_term": torch.tensor(float("nan"))})
        return out


def test_non_finite_loss_names_step_terms_and_checkpoint(data, tmp_path):
    trainer = _trainer(data, tmp_path, method=Explodes(at=7))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "step 7" in message
    assert "bad_term=nan" in message
    assert str(tmp_path / "last.pt") in message
    assert load_train_state(tmp_path / "last.pt")["step"] == 4  # the NaN step was never saved


def test_metrics_log_has_epochs_and_learning_rates(data, tmp_path):
    _trainer(data, tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_acc" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # cosine decays


def test_model_file_loads_into_create_with_plain_load_state_dict(tmp_path):
    model = create("resnet20", num_classes=7, in_channels=1)
    save_model(model, tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    fresh = create("resnet20", num_classes=7, in_channels=1)
    fresh.load_state_dict(state)
    assert _same_weights(fresh, model)
    assert _same_weights(load_model(tmp_path / "model.pt"), model)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    junk.with_suffix(".json").write_text(json.dumps({"spec": {"name": "mlp", "num_classes": 3, "in_channels": 1}}))
    with pytest.raises(CheckpointError, match=r"checkpoint '.*junk.pt' is damaged or not a file torch.save wrote"):
        load_model(junk)
    other = tmp_path / "other.pt"
    save_model(create("small_cnn", num_classes=10, in_channels=1), other)
    other.with_suffix(".json").write_text(json.dumps({"spec": {"name": "resnet20", "num_classes": 10, "in_channels": 1}}))
    with pytest.raises(CheckpointError, match="does not fit architecture"):
        load_model(other)
    bare = tmp_path / "bare.pt"
    atomic_save({"w": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        load_model(bare)
    with pytest.raises(CheckpointError, match="not an ensemble-kd training state"):
        load_train_state(bare)


class _Pickled:  # any class of the caller's: what weights_only refuses to rebuild
    pass


DAMAGE = {  # a file of ours (or a user's) as a full disk, a bad copy or a foreign script leaves it
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:path.stat().st_size // 2]),
    "cut at the end": lambda path: path.write_bytes(path.read_bytes()[:-1]),
    "garbage": lambda path: path.write_bytes(b"\x80\x02 not a torch file " * 20),
    "empty": lambda path: path.write_bytes(b""),
    "a pickled object": lambda path: torch.save({"format": "x", "model": _Pickled()}, path),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_torch_file_is_named_and_torchs_advice_never_relayed(data, tmp_path, damage):
    """Found in a fault sweep: a truncated last.pt said "Invalid argument" naming no file, and a pickled one
    repeated torch's advice to load it with weights_only=False, the one thing not to do with it."""
    from ensemble_kd.models.weights import read_state_dict

    trainer = _trainer(data, tmp_path / "run")
    model = tmp_path / "model.pt"
    save_model(create("mlp", num_classes=10, in_channels=1), model)
    atomic_save({"format": "ensemble-kd/train-state/1", "model": trainer.model.state_dict()}, trainer.state_path)
    for path in (trainer.state_path, model):
        DAMAGE[damage](path)
    why = "holds Python objects besides tensors" if damage == "a pickled object" else "is (damaged|empty)"
    said = []
    for read, name in ((lambda: trainer.fit(resume=True), "checkpoint '.*last.pt'"),
                       (lambda: load_model(model), "checkpoint '.*model.pt'"),
                       (lambda: read_state_dict(model), "weights file '.*model.pt'"),
                       (lambda: read_state_dict(model, shapes_only=True), "weights file '.*model.pt'")):
        with pytest.raises(ValueError, match=rf"{name} {why}") as err:
            read()
        said.append(str(err.value))
    assert not any("weights_only" in line or "Invalid argument" in line for line in said), said
    assert said[0].startswith("cannot resume: ")


def test_a_damaged_model_sidecar_is_named(tmp_path):
    model = tmp_path / "model.pt"
    save_model(create("mlp", num_classes=10, in_channels=1), model)
    model.with_suffix(".json").write_bytes(b"\xff{ not json")
    with pytest.raises(ValueError, match=r"'.*model.json' is damaged \(not valid JSON.*restore it, or train"):
        load_model(model)


def test_checkpoints_refuse_arbitrary_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "x", "obj": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_train_state(path)


def test_teacher_set_mixes_architectures_and_averages_probabilities():
    torch.manual_seed(0)
    members = [create("small_cnn", num_classes=4, in_channels=1), create("mlp", num_classes=4, in_channels=1)]
    teachers = TeacherSet(members)
    teachers.train()  # stays in eval mode
    assert not any(m.training for m in teachers.members)
    x = torch.randn(5, 1, 8, 8)
    logits = teachers.member_logits(x)
    assert logits.shape == (2, 5, 4)
    expected = (members[0](x).softmax(-1) + members[1](x).softmax(-1)) / 2
    torch.testing.assert_close(teachers(x), expected)
    assert not any(p.requires_grad for p in teachers.parameters())


def test_teacher_set_refuses_mixed_class_counts():
    teachers = TeacherSet([create("mlp", num_classes=4, in_channels=1), create("mlp", num_classes=5, in_channels=1)])
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        teachers.num_classes


def test_majority_vote_by_hand():
    p = torch.tensor([[[0.6, 0.4, 0.0]], [[0.1, 0.5, 0.4]], [[0.2, 0.45, 0.35]]])  # votes 0, 1, 1
    assert majority_vote(p).tolist() == [1]
    tie = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])  # one vote each: the higher mean probability wins
    assert majority_vote(tie).tolist() == [0]


def test_trainer_refuses_a_method_that_needs_teachers_without_them(data, tmp_path):
    class NeedsTeachers(CrossEntropy):
        from ensemble_kd.methods import Needs
        needs = Needs(teacher_logits=True)

    with pytest.raises(ValueError, match="needs teachers"):
        _trainer(data, tmp_path, method=NeedsTeachers())


@pytest.mark.parametrize("arch", ["small_cnn", "vgg11_bn", "resnet20", "wrn16_2"])
def test_fast_teachers_compute_the_same_function(arch):
    torch.manual_seed(1)
    members = [create(arch, num_classes=5, in_channels=3) for _ in range(2)]
    for m in members:  # non-trivial running statistics, so folding has something to fold
        m.train()
        m(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    x = torch.randn(4, 3, 8, 8)
    plain = TeacherSet(members).member_logits(x)
    fast = TeacherSet(members).prepare_for_inference(precision="fp32", channels_last=True)
    torch.testing.assert_close(fast.member_logits(x), plain, rtol=1e-4, atol=1e-4)
    folded = sum(isinstance(mod, nn.BatchNorm2d) for mod in fast.modules())
    assert folded < sum(isinstance(mod, nn.BatchNorm2d) for m in members for mod in m.modules())
    bf16 = TeacherSet(members).prepare_for_inference(precision="bf16")
    out = bf16.member_logits(x)
    assert out.dtype == torch.float32  # logits leave the teachers in fp32 whatever they ran in
    torch.testing.assert_close(out, plain, rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="precision"):
        TeacherSet(members).prepare_for_inference(precision="int8")


class KillAt(Method):
    """Wraps a method; at call `at` sends Ctrl-C to its own process (None: never)."""

    def __init__(self, inner, at=None):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    @property
    def needs(self):  # a method may settle its needs in bind (aekd's taps)
        return self.inner.needs

    def bind(self, student, teachers=None, example_x=None):
        self.inner.bind(student, teachers, example_x)

    def param_groups(self):
        return self.inner.param_groups()

    def teacher_indices(self, step, num_teachers, seed):
        return self.inner.teacher_indices(step, num_teachers, seed)

    def loss(self, batch, student, teachers=None):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner.loss(batch, student, teachers)


@pytest.mark.parametrize("method, options", [("aver", {}), ("aekd", {"variant": "features", "C": 0.7}),
                                             ("meal", {})])
def test_distill_resume_ends_with_the_same_weights(data, tmp_path, method, options):
    torch.manual_seed(3)
    teachers = TeacherSet([create("small_cnn", num_classes=10, in_channels=1, width=0.25) for _ in range(2)])
    config = load_config(None, TINY)

    def run(out, at=None, resume=False):
        student = pipeline.build_model(config.student, data)
        trainer = Trainer(student, KillAt(create_method(method, **options), at), data.train_loader(data.config.data, seed=7),
                          config.teachers.train, out, device=data.device, seed=7, teachers=teachers)
        return trainer, trainer.fit(resume=resume)

    _, reference = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", at=11)
    trainer, resumed = run(tmp_path / "run", resume=True)
    assert _same_weights(resumed, reference)
    if method != "aver":  # the method's own parameters (regressors, discriminators) resumed too
        ref_state = _trainer_method_state(tmp_path / "ref")
        assert ref_state.keys() == trainer.method.state_dict().keys()
        assert all(torch.equal(ref_state[k], v) for k, v in trainer.method.state_dict().items())


def _trainer_method_state(out_dir):
    return load_train_state(out_dir / "last.pt")["method"]
