"""KD and AVER: the loss by hand, its gradient, and AVER as the mean of per-teacher KD."""

import pytest
import torch
import torch.nn.functional as F

from ensemble_kd.data.loader import Batch
from ensemble_kd.methods import StudentOutput, TeacherOutput, create_method
from ensemble_kd.methods.kd import ensemble_target, kd_loss, teacher_kd_losses


def _batch(y):
    return Batch(None, torch.as_tensor(y), torch.arange(len(y)))


def test_kd_loss_by_hand():
    # T = 2, student logits (2, 0): p_s = softmax((1, 0)) = (e/(e+1), 1/(e+1)) = (0.7310586, 0.2689414).
    # Teacher q = (0.5, 0.5): KL(q || p_s) = 0.5·ln(0.5/0.7310586) + 0.5·ln(0.5/0.2689414)
    #   = 0.5·(-0.3798854) + 0.5·0.6201146 = 0.1201145; times T² = 4: 0.4804580.
    # Second row: T·KL with student (0, 0) -> p_s = (0.5, 0.5), q = (0.8, 0.2):
    #   KL = 0.8·ln(1.6) + 0.2·ln(0.4) = 0.3760034 - 0.1832581 = 0.1927448; times 4: 0.7709790.
    # The batch mean: (0.4804580 + 0.7709790) / 2 = 0.6257185.
    z = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    loss = kd_loss(z, q, 2.0)
    assert loss.item() == pytest.approx(0.6257185, abs=1e-6)
    # Gradient: d/dz of T²·KL(q || softmax(z/T)) / B = T·(p_s - q) / B.
    #   Row 1: 2·(0.7310586 - 0.5)/2 = 0.2310586;  row 2: 2·(0.5 - 0.8)/2 = -0.3.
    loss.backward()
    expected = torch.tensor([[0.2310586, -0.2310586], [-0.3, 0.3]])
    torch.testing.assert_close(z.grad, expected, atol=1e-6, rtol=0)


def test_kd_loss_is_batchmean_kl_div_and_handles_zero_probabilities():
    torch.manual_seed(0)
    z, zt = torch.randn(7, 5), torch.randn(7, 5)
    q = F.softmax(zt / 3.0, -1)
    reference = 9.0 * F.kl_div(F.log_softmax(z / 3.0, -1), q, reduction="batchmean")
    torch.testing.assert_close(kd_loss(z, q, 3.0), reference)
    one_hot = F.one_hot(torch.arange(7) % 5, 5).float()  # zeros in the target: 0·log 0 = 0
    assert torch.isfinite(kd_loss(z, one_hot, 1.0))
    torch.testing.assert_close(kd_loss(z, one_hot, 1.0), F.cross_entropy(z, torch.arange(7) % 5))


def test_kd_method_mixes_ce_and_soft_term_of_the_chosen_teacher():
    torch.manual_seed(1)
    z, zt, y = torch.randn(6, 4), torch.randn(3, 6, 4), torch.randint(0, 4, (6,))
    method = create_method("kd", alpha=0.7, temperature=2.0, teacher=2)
    out = method.loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    ce = F.cross_entropy(z, y)
    kd = kd_loss(z, F.softmax(zt[2] / 2.0, -1), 2.0)
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * kd)
    assert set(out.logs) == {"ce", "kd", "loss"}
    torch.testing.assert_close(out.logs["kd"], kd)
    with pytest.raises(ValueError, match="only 3 teachers"):
        create_method("kd", teacher=3).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))


def test_aver_is_the_mean_of_per_teacher_kd_up_to_the_ensembles_jsd():
    # KL(q̄ || p) = Σ q̄ log q̄ - Σ q̄ log p, and the second term is linear in q̄, so
    #   mean_m T²·KL(p_m || p) - T²·KL(q̄ || p) = T²·(H(q̄) - mean_m H(p_m)) = T²·JSD,
    # a constant for the student: the losses differ by it and the gradients are equal.
    torch.manual_seed(2)
    T, zt = 3.0, torch.randn(4, 8, 5) * 2
    z1 = torch.randn(8, 5, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    aver = kd_loss(z1, ensemble_target(zt, T, "probs"), T)
    per_teacher = teacher_kd_losses(z2, zt, T)
    p = F.softmax(zt / T, -1)
    entropy = lambda q: -(q * q.log()).sum(-1).mean(-1)  # noqa: E731 (batch-mean entropy)
    jsd = entropy(p.mean(0)) - entropy(p).mean()
    assert jsd > 0
    torch.testing.assert_close(aver, per_teacher.mean() - T * T * jsd, atol=1e-5, rtol=1e-5)
    aver.backward()
    per_teacher.mean().backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-7, rtol=1e-5)
    for m in range(4):  # and each per-teacher loss is the single-teacher KD loss
        torch.testing.assert_close(per_teacher[m], kd_loss(z2, p[m], T))


def test_aver_method_gradient_equals_mean_kd_gradient():
    torch.manual_seed(3)
    zt, y = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    z = torch.randn(5, 4, requires_grad=True)
    create_method("aver", alpha=0.8, temperature=4.0).loss(
        _batch(y), StudentOutput(z, {}), TeacherOutput(zt, {})).loss.backward()
    z2 = z.detach().clone().requires_grad_(True)
    (0.2 * F.cross_entropy(z2, y) + 0.8 * teacher_kd_losses(z2, zt, 4.0).mean()).backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_averaging_logits_is_a_different_target():
    torch.manual_seed(4)
    zt, y = torch.randn(3, 6, 5) * 3, torch.randint(0, 5, (6,))
    torch.testing.assert_close(ensemble_target(zt, 2.0, "logits"), F.softmax(zt.mean(0) / 2.0, -1))
    assert not torch.allclose(ensemble_target(zt, 2.0, "logits"), ensemble_target(zt, 2.0, "probs"), atol=1e-3)
    grads = []
    for target in ("probs", "logits"):
        z = torch.zeros(6, 5, requires_grad=True)
        out = create_method("aver", target=target).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
        out.loss.backward()
        grads.append(z.grad)
    assert not torch.allclose(grads[0], grads[1], atol=1e-4)


@pytest.mark.parametrize("name, options, match", [
    ("kd", {"alpha": 1.5}, "alpha"), ("kd", {"temperature": 0}, "temperature"),
    ("kd", {"teacher": -1}, "teacher"), ("aver", {"target": "mean"}, "target"),
    ("aver", {"tau": 2}, "bad option"),
])
def test_bad_options_are_named(name, options, match):
    with pytest.raises(ValueError, match=match):
        create_method(name, **options)


def test_missing_teacher_logits_are_named():
    with pytest.raises(ValueError, match="needs teacher logits"):
        create_method("aver").loss(_batch([0]), StudentOutput(torch.zeros(1, 2), {}), TeacherOutput(None, {}))


def test_aver_at_aekd_weights_equals_aekd_at_c_one_over_m():
    # AE-KD's AVER is its Eq. 7 with equal weights: CE weight 1 plus 0.9 KD (the authors' -r 1 -a 0.9).
    # aekd at C = 1/M weights the per-teacher KD losses 1/M each: the same gradient, and the same loss
    # but for the ensemble's T²·JSD (aver's KD is towards the mean, aekd's the mean of the KDs: see above).
    torch.manual_seed(5)
    M, T, zt, y = 4, 4.0, torch.randn(4, 6, 5) * 2, torch.randint(0, 5, (6,))
    z1 = torch.randn(6, 5, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    aver = create_method("aver", ce_weight=1.0, kd_weight=0.9, temperature=T).loss(
        _batch(y), StudentOutput(z1, {}), TeacherOutput(zt, {}))
    aekd = create_method("aekd", C=1 / M, ce_weight=1.0, kd_weight=0.9, temperature=T).loss(
        _batch(y), StudentOutput(z2, {}), TeacherOutput(zt, {}))
    p = F.softmax(zt / T, -1)
    entropy = lambda q: -(q * q.log()).sum(-1).mean(-1)  # noqa: E731
    jsd = entropy(p.mean(0)) - entropy(p).mean()
    torch.testing.assert_close(aver.loss, aekd.loss - 0.9 * T * T * jsd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aver.logs["ce"], aekd.logs["ce"])
    aver.loss.backward()
    aekd.loss.backward()
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-7, rtol=1e-5)
    # the default alpha form is another loss: CE weight 0.1, KD 0.9
    z3 = z1.detach().clone().requires_grad_(True)
    create_method("aver", temperature=T).loss(_batch(y), StudentOutput(z3, {}), TeacherOutput(zt, {})).loss.backward()
    assert not torch.allclose(z3.grad, z1.grad, atol=1e-4)


def test_kd_and_aver_weights_options():
    torch.manual_seed(6)
    zt, y = torch.randn(2, 4, 3), torch.randint(0, 3, (4,))
    z = torch.randn(4, 3)
    for name in ("kd", "aver"):
        a = create_method(name, alpha=0.3).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
        b = create_method(name, ce_weight=0.7, kd_weight=0.3).loss(_batch(y), StudentOutput(z, {}),
                                                                   TeacherOutput(zt, {}))
        torch.testing.assert_close(a.loss, b.loss)
        torch.testing.assert_close(b.loss, 0.7 * b.logs["ce"] + 0.3 * b.logs["kd"])
        with pytest.raises(ValueError, match="not both"):
            create_method(name, alpha=0.5, kd_weight=0.9)
        with pytest.raises(ValueError, match="ce_weight"):
            create_method(name, ce_weight=-1)
    c = create_method("aver", kd_weight=0.9)  # the other weight defaults to AE-KD's (CE 1)
    assert (c.ce_weight, c.kd_weight) == (1.0, 0.9)
