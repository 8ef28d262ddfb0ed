"""MEAL (METHODS.md §1): alignment, similarity losses, discriminators, joint vs minimax, teacher choice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data.loader import Batch
from ensemble_kd.engine import Trainer
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.methods import Needs, StudentOutput, create_method
from ensemble_kd.methods.meal import (Discriminator, adversarial_loss, align, discriminator_inputs,
                                      draw_teacher, similarity, TAP_WEIGHTS)
from ensemble_kd.models import create, forward_with_taps

from _zoo import zoo_models  # noqa: E402


# --------------------------------------------------------------------------- alignment
def test_avg_alignment_by_hand_down_and_up():
    # two channels of a 2x2 map: positions [1, 2, 3, 4] and [3, 4, 5, 6]; channel mean [2, 3, 4, 5]
    tap = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[3.0, 4.0], [5.0, 6.0]]]])
    torch.testing.assert_close(align(tap, 2, "avg"), torch.tensor([[2.5, 4.5]]))  # down: pairs averaged
    torch.testing.assert_close(align(tap, 1, "avg"), torch.tensor([[3.5]]))
    torch.testing.assert_close(align(tap, 4, "avg"), torch.tensor([[2.0, 3.0, 4.0, 5.0]]))  # same length
    # up: 4 -> 8 repeats each position twice (adaptive windows [floor(i*4/8), ceil((i+1)*4/8)))
    torch.testing.assert_close(align(tap, 8, "avg"), torch.tensor([[2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0, 5.0]]))


def test_max_alignment_by_hand_down_and_up():
    tap = torch.tensor([[[[1.0, 9.0], [3.0, 0.0]], [[2.0, 4.0], [7.0, 5.0]]]])  # channel max [2, 9, 7, 5]
    torch.testing.assert_close(align(tap, 2, "max"), torch.tensor([[9.0, 7.0]]))
    torch.testing.assert_close(align(tap, 1, "max"), torch.tensor([[9.0]]))
    torch.testing.assert_close(align(tap, 8, "max"), torch.tensor([[2.0, 2.0, 9.0, 9.0, 7.0, 7.0, 5.0, 5.0]]))


def test_uneven_windows_overlap_like_adaptive_pooling():
    tap = torch.arange(5.0).reshape(1, 1, 1, 5)  # 5 positions to 2: windows [0, 3) and [2, 5)
    torch.testing.assert_close(align(tap, 2, "avg"), torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(align(tap, 2, "max"), torch.tensor([[2.0, 4.0]]))


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("length", [3, 16, 50])
def test_reducing_channels_first_equals_the_definition(pool, length):
    torch.manual_seed(0)
    tap = torch.randn(4, 6, 5, 4)  # 20 positions
    flat = tap.flatten(2)
    if pool == "avg":
        expected = F.adaptive_avg_pool1d(flat, length).mean(1)
    else:
        expected = F.adaptive_max_pool1d(flat, length).amax(1)
    torch.testing.assert_close(align(tap, length, pool), expected)


def test_vectors_and_logits_are_one_channel_and_logits_keep_their_length():
    z = torch.randn(3, 10)
    torch.testing.assert_close(align(z, 10), z)
    torch.testing.assert_close(align(z, 5), F.avg_pool1d(z[:, None], 2).squeeze(1))
    with pytest.raises(ValueError, match="pool must be"):
        align(z, 5, "median")


def test_different_teacher_and_student_shapes_land_on_one_length():
    teacher, student = torch.randn(2, 64, 16, 16), torch.randn(2, 8, 8, 8)
    assert align(teacher, 64).shape == align(student, 64).shape == (2, 64)


# --------------------------------------------------------------------------- similarity
def test_each_similarity_loss_on_a_hand_case():
    s = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))  # softmax(s) = p exactly
    q = torch.tensor([[0.25, 0.25, 0.5]])
    p = torch.tensor([[0.5, 0.25, 0.25]])
    ce = -(0.25 * math.log(0.5) + 0.25 * math.log(0.25) + 0.5 * math.log(0.25))
    entropy = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    torch.testing.assert_close(similarity(s, q, "ce"), torch.tensor(ce))
    torch.testing.assert_close(similarity(s, q, "kl"), torch.tensor(ce - entropy))
    torch.testing.assert_close(similarity(s, q, "l1"), torch.tensor((0.25 + 0 + 0.25) / 3))
    torch.testing.assert_close(similarity(s, q, "l2"), torch.tensor((0.0625 + 0 + 0.0625) / 3))
    assert float(similarity(s, p, "kl")) == pytest.approx(0.0, abs=1e-7)
    assert float(similarity(s, p, "l1")) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="similarity must be"):
        similarity(s, q, "cosine")


def test_ce_and_kl_give_the_same_gradient():
    torch.manual_seed(1)
    s = torch.randn(4, 7, requires_grad=True)
    q = torch.softmax(torch.randn(4, 7), -1)
    (g_ce,) = torch.autograd.grad(similarity(s, q, "ce"), s)
    (g_kl,) = torch.autograd.grad(similarity(s, q, "kl"), s)
    torch.testing.assert_close(g_ce, g_kl)
    torch.testing.assert_close(g_ce, (torch.softmax(s, -1) - q).detach() / 4)


# --------------------------------------------------------------------------- discriminators
@pytest.mark.parametrize("d, hidden", [(1024, (512, 256)), (10, (5, 2)), (3, (1, 1))])
def test_discriminator_shapes(d, hidden):
    disc = Discriminator(d)
    linears = [m for m in disc.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(d, hidden[0]), hidden, (hidden[1], 2)]
    out = disc(torch.randn(6, d))
    assert out.shape == (6, 2) and bool((out >= 0).all())  # ReLU after the last layer too
    assert [type(m).__name__ for m in disc.layers] == ["Linear", "ReLU"] * 3


def test_discriminator_targets_for_both_layouts():
    s, t = torch.full((3, 4), 1.0), torch.full((3, 4), 2.0)
    x, targets = discriminator_inputs(s, t, "separate")
    assert x.shape == (6, 4)
    assert torch.equal(x[:3], s) and torch.equal(x[3:], t)
    assert torch.equal(targets, torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3))
    x, targets = discriminator_inputs(s, t, "pair")
    assert x.shape == (6, 8)
    assert torch.equal(x[:3], torch.cat([s, t], 1)) and torch.equal(x[3:], torch.cat([t, s], 1))
    assert torch.equal(targets, torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3))


def test_adversarial_loss_is_the_bce_of_the_discriminator_on_those_targets():
    torch.manual_seed(2)
    disc = Discriminator(6)
    s, t = torch.randn(5, 6), torch.randn(5, 6)
    x, targets = discriminator_inputs(s, t)
    expected = F.binary_cross_entropy_with_logits(disc(x), targets)
    torch.testing.assert_close(adversarial_loss(disc, s, t), expected)


def test_minimax_reverses_the_students_gradient_and_joint_follows_the_discriminator():
    torch.manual_seed(3)
    disc = Discriminator(8)
    t = torch.randn(4, 8)
    s0 = torch.randn(4, 8)
    grads = {}
    for mode in ("joint", "minimax"):
        s = s0.clone().requires_grad_()
        disc.zero_grad()
        adversarial_loss(disc, s, t, "separate", mode).backward()
        grads[mode] = (s.grad.clone(), [p.grad.clone() for p in disc.parameters()])
    # the gradient of the discriminator's own loss at the student's features
    s = s0.clone().requires_grad_()
    x, targets = discriminator_inputs(s, t)
    (bce_grad,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(disc(x), targets), s)
    assert bce_grad.abs().sum() > 0
    torch.testing.assert_close(grads["joint"][0], bce_grad)  # joint: the student descends the same loss
    torch.testing.assert_close(grads["minimax"][0], -bce_grad)  # minimax: it ascends it
    for a, b in zip(grads["joint"][1], grads["minimax"][1]):  # the discriminator descends in both
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- teacher choice
def test_random_teacher_choice_is_uniform_and_reproducible():
    M, n = 5, 20000
    draws = np.array([draw_teacher(7, step, M) for step in range(n)])
    counts = np.bincount(draws, minlength=M)
    chi2 = float(((counts - n / M) ** 2 / (n / M)).sum())
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom: p = 0.001
    assert np.array_equal(draws[:100], [draw_teacher(7, step, M) for step in range(100)])
    other = np.array([draw_teacher(8, step, M) for step in range(100)])
    assert not np.array_equal(draws[:100], other)
    method = create_method("meal")
    assert method.teacher_indices(12, M, 7) == [draw_teacher(7, 12, M)]
    assert create_method("meal", teacher_choice="combine").teacher_indices(12, M, 7) is None


def test_teacher_set_runs_only_the_chosen_members():
    torch.manual_seed(0)
    members = [create("small_cnn", num_classes=4, in_channels=1, width=0.25) for _ in range(3)]
    calls = []
    for i, m in enumerate(members):
        m.register_forward_hook(lambda *_, i=i: calls.append(i))
    teachers = TeacherSet(members)
    x = torch.randn(2, 1, 8, 8)
    out = teachers.outputs(x, Needs(teacher_logits=True, teacher_taps=("layer2",)), members=[2])
    assert calls == [2] and out.logits.shape == (1, 2, 4) and len(out.taps["layer2"]) == 1
    torch.testing.assert_close(out.logits[0], members[2](x))


def test_teacher_batch_statistics_leave_the_running_ones_alone():
    torch.manual_seed(0)
    member = create("small_cnn", num_classes=4, in_channels=1, width=0.25)
    member.train()
    for _ in range(3):  # running statistics away from their initial values
        member(torch.randn(8, 1, 8, 8) * 3 + 1)
    teachers = TeacherSet([member])
    before = {k: v.clone() for k, v in member.state_dict().items()}
    x = torch.randn(8, 1, 8, 8)
    train_bn = teachers.outputs(x, Needs(teacher_logits=True, teacher_bn="train")).logits[0]
    assert all(torch.equal(before[k], v) for k, v in member.state_dict().items())
    assert not member.training and all(not m.training for m in member.modules())
    reference = member.train()(x)  # plain train mode: batch statistics (and it updates the running ones)
    torch.testing.assert_close(train_bn, reference)
    member.eval()
    assert not torch.allclose(teachers.outputs(x, Needs(teacher_logits=True)).logits[0], train_bn)
    folded = TeacherSet([member]).prepare_for_inference(fold_bn=True)
    with pytest.raises(ValueError, match="fold_bn=false"):
        folded.outputs(x, Needs(teacher_logits=True, teacher_bn="train"))


# --------------------------------------------------------------------------- the method
def _models(seed=0, K=4):
    torch.manual_seed(seed)
    teachers = TeacherSet([create("small_cnn", num_classes=K, in_channels=1, width=0.5) for _ in range(3)])
    student = create("small_cnn", num_classes=K, in_channels=1, width=0.25)
    return teachers, student, torch.randn(6, 1, 8, 8), torch.randint(0, K, (6,))


def _loss(method, teachers, student, x, y, members=None):
    logits, taps = forward_with_taps(student, x, method.needs.student_taps)
    out = teachers.outputs(x, method.needs, members=members)
    return method.loss(Batch(x, y, torch.arange(len(y))), StudentOutput(logits, taps), out), out


def test_bind_takes_the_block_taps_their_lengths_and_the_papers_weights():
    teachers, student, x, _ = _models()
    method = create_method("meal")
    method.bind(student, teachers, x)
    assert method.student_taps == method.teacher_taps == ("layer1", "layer2", "layer3", "logits")
    assert method.lengths == [64, 16, 4, 4]  # 8x8, 4x4 and 2x2 maps, K = 4 logits
    assert method.tap_weights == [0.01, 0.05, 0.1, 1.0]
    assert [d.layers[0].in_features for d in method.discriminators] == [64, 16, 4, 4]
    assert method.needs.teacher_taps == method.needs.student_taps == ("layer1", "layer2", "layer3")
    pair = create_method("meal", layout="pair", taps=["layer2", "layer3", "logits"], lengths=[8, 4, 4])
    pair.bind(student, teachers, x)
    assert pair.tap_weights == [0.01, 0.05, 1.0]
    assert [d.layers[0].in_features for d in pair.discriminators] == [16, 8, 8]
    logits_only = create_method("meal", taps=["logits"], adversarial="none")
    logits_only.bind(student, teachers, x)
    assert logits_only.needs.teacher_taps == () and len(logits_only.discriminators) == 0


def test_teachers_of_another_architecture_align_to_the_same_lengths():
    torch.manual_seed(0)
    teachers = TeacherSet([create("resnet20", num_classes=4, in_channels=1)])  # 16/32/64 channels
    student = create("small_cnn", num_classes=4, in_channels=1, width=0.25)  # 8/16/32 channels
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    method = create_method("meal", lengths=[32, 8, 2, 4])  # down-sampling every map
    method.bind(student, teachers, x)
    assert method.teacher_taps == ("layer1", "layer2", "layer3", "logits")
    out, _ = _loss(method, teachers, student, x, y, members=[0])
    assert torch.isfinite(out.loss) and out.loss.requires_grad


def test_loss_is_the_weighted_sum_of_its_terms_and_reaches_every_part():
    teachers, student, x, y = _models()
    method = create_method("meal", alpha=0.7, beta=0.3, ce_weight=0.5)
    method.bind(student, teachers, x)
    out, t_out = _loss(method, teachers, student, x, y, members=[1])
    logs = out.logs
    sim = sum(w * logs[f"sim_{j}"] for j, w in enumerate(method.tap_weights))
    gan = sum(logs[f"gan_{j}"] for j in range(4))
    torch.testing.assert_close(out.loss.detach(), 0.7 * sim + 0.3 * gan + 0.5 * logs["ce"])
    # the logits term by hand: CE between softmaxes of the student's and teacher 1's logits
    z_s = student(x)
    expected = -(F.softmax(t_out.logits[0], -1) * F.log_softmax(z_s, -1)).sum(-1).mean()
    torch.testing.assert_close(logs["sim_3"], expected.detach())
    out.loss.backward()
    # every discriminator is in the graph (a small one may be dead behind its final ReLU: zero, not None)
    assert all(p.grad is not None for p in method.parameters())
    assert method.discriminators[0].layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.parameters())


def test_combine_targets_the_mean_of_the_teachers_probabilities():
    teachers, student, x, y = _models()
    method = create_method("meal", teacher_choice="combine", taps=["logits"], adversarial="none")
    method.bind(student, teachers, x)
    out, t_out = _loss(method, teachers, student, x, y)
    assert t_out.logits.shape[0] == 3
    q = F.softmax(t_out.logits, -1).mean(0)
    expected = -(q * F.log_softmax(student(x), -1)).sum(-1).mean()
    torch.testing.assert_close(out.loss.detach(), expected.detach())


def test_bad_options_and_mismatched_taps_fail_clearly():
    for options, match in [({"similarity": "cos"}, "similarity"), ({"adversarial": "both"}, "adversarial"),
                           ({"layout": "stack"}, "layout"), ({"lengths": [0]}, "lengths"),
                           ({"teacher_bn": "frozen"}, "teacher_bn"), ({"disc_reduction": 0}, "disc_reduction")]:
        with pytest.raises(ValueError, match=match):
            create_method("meal", **options)
    teachers, student, x, _ = _models()
    with pytest.raises(ValueError, match="as many student taps as teacher taps"):
        create_method("meal", taps=["layer3", "logits"], teacher_taps=["logits"]).bind(student, teachers, x)
    with pytest.raises(ValueError, match="tap_weights has 1 entries for 2 taps"):
        create_method("meal", taps=["layer3", "logits"], tap_weights=[1.0]).bind(student, teachers, x)
    with pytest.raises(ValueError, match="not bound"):
        create_method("meal").loss(None, None, None)


def test_discriminators_learn_at_their_own_rate_on_the_same_schedule(tmp_path):
    config = load_config(None, TINY)
    data = pipeline.prepare_data(load_config(None, TINY + ["device=cpu"]))
    teachers, _, _, _ = _models(K=10)
    model = pipeline.build_model(config.student, data)
    train = config.student.train.model_copy(update={"epochs": 2})
    trainer = Trainer(model, create_method("meal", disc_lr=0.002), data.train_loader(data.config.data, seed=0),
                      train, tmp_path, device=data.device, seed=0, teachers=teachers)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr_discriminators" in r and "step" in r and "sim" in r]
    assert len({r["lr"] for r in steps}) > 1  # the schedule moves
    for r in steps:
        assert r["lr_discriminators"] == pytest.approx(r["lr"] * 0.002 / train.optim.lr)


# --------------------------------------------------------------------------- in the engine
TINY = ["data.batch_size=512", "student.kwargs={width: 0.25}", "student.train.epochs=1",
        "student.train.log_every=1"]  # 3 steps


REAL = ["data.batch_size=64", "student.kwargs={width: 0.25}", "student.train.epochs=6", "teachers.train.epochs=6",
        "teachers.count=2", "teachers.kwargs={width: 0.5}", "student.train.log_every=10", "device=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = load_config(None, REAL)
    data = pipeline.prepare_data(config)
    teachers = pipeline.train_teachers(config, tmp_path_factory.mktemp("meal") / "teachers", data=data)
    return config, data, pipeline.fast_teachers(config, teachers)


@pytest.mark.parametrize("options", [{}, {"adversarial": "minimax", "layout": "pair", "pool": "max"}])
def test_meal_trains_end_to_end_on_digits(trained, tmp_path, options):
    """A short real run (the teachers reach about 97%): the student learns from MEAL's loss alone
    (no hard labels by default); 92% for the student alone on this budget."""
    config, data, teachers = trained
    method = create_method("meal", **options)
    model = pipeline.build_model(config.student, data)
    trainer = Trainer(model, method, data.train_loader(config.data, seed=0), config.student.train, tmp_path,
                      device=data.device, seed=0, teachers=teachers)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    trainer.fit()
    model.eval()
    correct = sum(int((model(b.x).argmax(1) == b.y).sum()) for b in data.test.batches(0))
    accuracy = correct / len(data.splits.test)
    assert accuracy > 0.88, accuracy  # chance is 0.10
    assert any(not torch.equal(before[k], v) for k, v in method.state_dict().items())  # discriminators trained
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sims = [r["sim"] for r in records if "sim" in r]
    assert sims[-1] < sims[0]


def test_teachers_on_batch_statistics_are_given_unfolded(trained):
    """Shared teachers (the demo's) are folded; a method that wants their BatchNorm gets unfolded copies."""
    config, data, folded = trained
    assert folded.folded
    meal_config = config.model_copy(update={"method": config.method.model_copy(
        update={"name": "meal", "options": {"teacher_bn": "train"}})})
    method, teachers = pipeline.prepare_distill(meal_config, data, folded)
    assert method.needs.teacher_bn == "train" and not teachers.folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teachers.members[0].modules())
    batch = next(data.train_loader(config.data, seed=0).batches(0))
    method.bind(pipeline.build_model(config.student, data), teachers, batch.x)  # resolves the stage taps
    out = teachers.outputs(batch.x, method.needs)
    assert torch.isfinite(out.logits).all()


# Built from a base (their taps are the base's, wrapped) or not an image classifier (video frames).
NOT_IMAGE_CLASSIFIERS = {"batchensemble", "multihead", "dbof"}


@pytest.mark.parametrize("arch", sorted(set(zoo_models()) - NOT_IMAGE_CLASSIFIERS))
def test_meal_runs_with_its_defaults_on_every_zoo_model(arch):
    torch.manual_seed(0)
    kwargs = {"image_size": 8} if arch == "mlp" else {}
    teachers = TeacherSet([create(arch, num_classes=3, in_channels=1, **kwargs)])
    student = create(arch, num_classes=3, in_channels=1, **kwargs)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    method = create_method("meal")
    method.bind(student, teachers, x)
    n = len(method.student_taps)
    assert 2 <= n <= 5 and method.student_taps[-1] == "logits"
    assert method.tap_weights == list(TAP_WEIGHTS[n])  # the paper's list for that many taps
    (out, _) = _loss(method, teachers, student, x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and any(p.grad is not None for p in student.parameters())


def test_meal_taps_a_vgg_at_its_first_four_pooled_outputs_and_the_logits():
    student = create("vgg11_bn", num_classes=3, in_channels=1)
    method = create_method("meal")
    method.bind(student, TeacherSet([create("vgg11_bn", num_classes=3, in_channels=1)]), torch.randn(2, 1, 8, 8))
    pools = [f"features.{i}" for i, m in enumerate(student.features) if isinstance(m, torch.nn.MaxPool2d)]
    assert method.student_taps == (*pools[:4], "logits")  # the authors' VGG: the 5th pool gives way to the logits
    assert method.tap_weights == [0.001, 0.01, 0.05, 0.1, 1.0]
