"""LatentBE (METHODS.md §4): one-to-one distillation into a BatchEnsemble, collapse, perturbations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ensemble_kd import pipeline
from ensemble_kd.config import ConfigError, load_config
from ensemble_kd.data.loader import Batch
from ensemble_kd.engine import Trainer
from ensemble_kd.perturbations import Perturbation, ods_delta, tdiv_sdiv_delta
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.methods import StudentOutput, TeacherOutput, create_method
from ensemble_kd.methods import latentbe
from ensemble_kd.methods.kd import teacher_kd_losses
from ensemble_kd.models import batchensemble, create, forward_with_taps


def _be(members=3, K=4, seed=0):
    torch.manual_seed(seed)
    return create("batchensemble", num_classes=K, in_channels=1, base="small_cnn", members=members, init="normal",
                  base_kwargs={"width": 0.25})


def _teachers(M=3, K=4, seed=1):
    torch.manual_seed(seed)
    return TeacherSet([create("small_cnn", num_classes=K, in_channels=1, width=0.25) for _ in range(M)])


# --------------------------------------------------------------------------- the loss
def test_member_i_learns_from_teacher_i_alone():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    y = torch.randint(0, 4, (5,))
    losses = teacher_kd_losses(z_s, z_t, 2.0)
    for i in range(3):  # T²·KL(p_t,i || p_s,i), batch mean
        expected = 4.0 * F.kl_div(F.log_softmax(z_s[i] / 2, -1), F.softmax(z_t[i] / 2, -1), reduction="batchmean")
        torch.testing.assert_close(losses[i], expected)
    method = create_method("latentbe", alpha=0.3, temperature=2.0, factor_decay=0.0)
    out = method.loss(Batch(None, y, torch.arange(5)), StudentOutput(z_s.mean(0), {"members_out": z_s}),
                      TeacherOutput(z_t, {}))
    ce = sum(F.cross_entropy(z_s[i], y) for i in range(3)) / 3
    torch.testing.assert_close(out.loss, 0.7 * ce + 0.3 * losses.mean())
    # pairs, not an average: the student equal to its teachers member by member has no KD loss
    assert float(teacher_kd_losses(z_t, z_t, 2.0).abs().max()) < 1e-6
    assert float(teacher_kd_losses(z_t.flip(0), z_t, 2.0).mean()) > 0.01


def test_factors_are_pulled_to_one_with_gradients_times_m_and_no_weight_decay(tmp_path):
    student, teachers = _be(), _teachers()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 4, (4,))
    factors = student.factor_parameters()

    def grads(method):
        method.bind(student, teachers, x)
        student.zero_grad()
        logits, taps = forward_with_taps(student, x, method.needs.student_taps)
        out = method.loss(Batch(x, y, torch.arange(4)), StudentOutput(logits, taps), teachers.outputs(x, method.needs))
        out.loss.backward()
        return out, [f.grad.clone() for f in factors]

    _, plain = grads(create_method("latentbe", factor_decay=0.1, scale_factor_grads=False))
    out, scaled = grads(create_method("latentbe", factor_decay=0.1))  # its hooks multiply by M = 3
    pull = sum(0.5 * (1 - f).pow(2).sum() for f in factors) / 3
    torch.testing.assert_close(out.logs["factor_pull"], pull.detach())
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, 3 * b)
    config = load_config(None, ["device=cpu"])
    data = pipeline.prepare_data(config)
    trainer = Trainer(_be(K=10), create_method("latentbe"), data.train_loader(config.data, 0),
                      config.student.train, tmp_path, device=data.device, teachers=_teachers(K=10))
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & {id(f) for f in trainer.model.factor_parameters()}
    assert decayed  # the shared weights still decay


def test_student_spec_bind_and_collapse_export():
    method = create_method("latentbe")
    arch, kwargs = method.student_spec("small_cnn", {"width": 0.25}, num_teachers=4)
    assert arch == "batchensemble" and kwargs["members"] == 4 and kwargs["base"] == "small_cnn"
    with pytest.raises(ValueError, match="number of members"):
        method.student_spec("small_cnn", {})
    with pytest.raises(ValueError, match="3 members, 2 teachers"):
        method.bind(_be(members=3), _teachers(M=2))
    with pytest.raises(ValueError, match="BatchEnsemble student"):
        method.bind(create("small_cnn"), _teachers())
    assert latentbe.collapse is batchensemble.collapse
    net = method.deployable(_be())
    assert type(net).__name__ == "SmallCNN"


def test_recalibrate_bn_gives_the_collapsed_network_its_own_batchnorm_statistics():
    """The BE's statistics pool every member's activations; re-estimated on k batches of training
    inputs they are the collapsed network's: in eval mode it then computes what train mode (the
    batch's own statistics) does on that batch, up to the unbiased variance."""
    be = _be().train()
    x = torch.randn(512, 1, 8, 8)
    with torch.no_grad():
        be(x)  # the BE's running statistics, over its 3 members' activations
    kept = create_method("latentbe").deployable(be.eval(), iter([x]))
    recalibrated = create_method("latentbe", recalibrate_bn=1).deployable(be, iter([x, torch.randn(512, 1, 8, 8)]))
    with torch.no_grad():
        own = recalibrated.train()(x)  # batch statistics of x (train mode; running stats already set)
        recalibrated.eval()
        gap_recalibrated, gap_kept = (own - recalibrated(x)).abs().max(), (own - kept.eval()(x)).abs().max()
    assert gap_recalibrated < 1e-2 < gap_kept, (gap_recalibrated, gap_kept)
    bn = [m for m in recalibrated.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(m.momentum == 0.1 for m in bn)  # update_bn restores the momentum it overrode
    with pytest.raises(ValueError, match="recalibrate_bn must be a number of batches"):
        create_method("latentbe", recalibrate_bn=-1)


# --------------------------------------------------------------------------- perturbations
def test_ods_direction_is_the_gradient_of_the_stated_objective_with_the_stated_norm():
    torch.manual_seed(0)
    model = create("small_cnn", num_classes=5, in_channels=1, width=0.25).eval()
    x01 = torch.rand(6, 1, 8, 8)
    w = torch.rand(5) * 2 - 1
    delta = ods_delta(model, x01, w, step=2.0, temperature=1.5)
    x = x01.clone().requires_grad_()
    (grad,) = torch.autograd.grad((F.softmax(model(x) / 1.5, -1) * w).sum(), x)
    cosine = F.cosine_similarity(delta.flatten(1), grad.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(6))
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((6,), math.sqrt(64) * 2 / 255))
    conf = ods_delta(model, x01, w, step=2.0, temperature=1.5, confidence=True)
    max_p = F.softmax(model(x01) / 1.5, -1).amax(-1)
    torch.testing.assert_close(conf.flatten(1).norm(dim=1), math.sqrt(64) * 2 / 255 * max_p.detach())


class _Spy(TeacherSet):
    def member_forward(self, i, x):
        self.calls.append(i)
        return super().member_forward(i, x)


def test_tdiv_sdiv_uses_one_pair_for_teachers_and_student():
    teachers = _Spy(list(_teachers(M=4).members))
    teachers.calls = []
    student = _be(members=4)
    perturb = Perturbation("tdiv_sdiv", step=1.0, mean=(0.5,), std=(0.25,))
    x = torch.randn(5, 1, 8, 8)
    out = perturb(Batch(x, torch.zeros(5, dtype=torch.long), torch.arange(5)), teachers, student, step=3, seed=0)
    i, j = teachers.calls
    assert i != j
    # the step, recomputed with the student's members (i, j): the same direction
    x01 = x * 0.25 + 0.5
    expected = tdiv_sdiv_delta(lambda z: teachers.member_forward(i, (z - 0.5) / 0.25),
                               lambda z: teachers.member_forward(j, (z - 0.5) / 0.25),
                               lambda z: _members(student, (z - 0.5) / 0.25), (i, j), x01)
    moved = (x01 + expected).clamp(0, 1)
    torch.testing.assert_close(out.x * 0.25 + 0.5, moved, atol=1e-5, rtol=0)
    assert student.training  # BatchNorm went back to train mode after the eval-mode step
    other = tdiv_sdiv_delta(lambda z: teachers.member_forward(i, (z - 0.5) / 0.25),
                            lambda z: teachers.member_forward(j, (z - 0.5) / 0.25),
                            lambda z: _members(student, (z - 0.5) / 0.25), ((i + 1) % 4, (j + 1) % 4), x01)
    assert not torch.allclose(other, expected)  # another student pair is another step


def _members(student, x):
    was = student.training
    student.eval()
    out = student.forward_members(x)
    student.train(was)
    return out


def test_gaussian_fraction_and_clipping():
    teachers = _teachers()
    x01 = torch.rand(8, 1, 8, 8)
    x = (x01 - 0.5) / 0.25
    perturb = Perturbation("gaussian", step=40.0, fraction=0.5, mean=(0.5,), std=(0.25,))
    out = perturb(Batch(x, torch.zeros(8, dtype=torch.long), torch.arange(8)), teachers, None, step=0, seed=0)
    moved = out.x * 0.25 + 0.5
    assert torch.equal(out.x[4:], x[4:]) and not torch.allclose(out.x[:4], x[:4])  # half the batch replaced
    assert float(moved.min()) >= -1e-6 and float(moved.max()) <= 1 + 1e-6
    again = perturb(Batch(x, torch.zeros(8, dtype=torch.long), torch.arange(8)), teachers, None, step=0, seed=0)
    assert torch.equal(again.x, out.x)  # a function of (seed, step)
    noise = (moved[:4] - x01[:4])[(moved[:4] > 0.01) & (moved[:4] < 0.99)]
    assert 0.1 < float(noise.std()) < 0.2  # 40/255 = 0.157
    with pytest.raises(ValueError, match="kind must be one of"):
        Perturbation("fgsm", mean=(0.5,), std=(0.25,))


def test_perturbations_are_refused_without_teachers_or_with_a_cache():
    data = pipeline.prepare_data(load_config(None, ["device=cpu"]))
    with pytest.raises(ConfigError, match="has no teachers"):
        pipeline.prepare_distill(load_config(None, ["perturb.kind=ods"]), data)
    with pytest.raises(ValueError, match="cache cannot"):
        Perturbation("ods", mean=(0.5,), std=(0.25,))(
            Batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.arange(2)), object(), None,
            step=0, seed=0)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def digits_teachers(tmp_path_factory):
    config = load_config(None, ["data.batch_size=64", "teachers.count=2", "teachers.train.epochs=6",
                                "teachers.kwargs={width: 0.5}", "device=cpu"])
    data = pipeline.prepare_data(config)
    return data, pipeline.train_teachers(config, tmp_path_factory.mktemp("lbe") / "teachers", data=data)


@pytest.mark.parametrize("perturb", ["none", "confods"])
def test_latentbe_trains_on_digits_and_reports_the_collapsed_network(digits_teachers, tmp_path, perturb):
    data, teachers = digits_teachers
    config = load_config(None, ["data.batch_size=64", "student.kwargs={width: 0.25}", "student.train.epochs=6",
                                "method.name=latentbe", "device=cpu", "eval.latency=false",
                                f"perturb.kind={perturb}"])
    method, fast = pipeline.prepare_distill(config, data, pipeline.fast_teachers(config, teachers))
    model, info = pipeline.distill(config, tmp_path / "student", data=data, teachers=fast, method=method)
    assert model.spec["name"] == "batchensemble" and model.members == 2
    collapsed, whole = pipeline.evaluate_student(config, model, data, info)
    assert collapsed["part"] == "collapsed" and whole["part"] == "BE"
    assert collapsed["params"] < whole["params"] and collapsed["flops"] < whole["flops"]
    assert collapsed["acc"] > 0.85 and whole["acc"] > 0.85  # the student alone: about 92% on this budget
    plain = create(**model.base_spec)  # the collapsed network is saved as a plain checkpoint too
    plain.load_state_dict(torch.load(tmp_path / "student" / "collapsed.pt", weights_only=True))
