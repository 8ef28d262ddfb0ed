"""AE-KD: the exact capped min-norm solver against two references, degenerate inputs, the
analytic logit gradients, the feature variant's gradients, and a run through the engine."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd.data.loader import Batch
from ensemble_kd.engine import Trainer
from ensemble_kd.ensemble import TeacherSet
from ensemble_kd.methods import StudentOutput, TeacherOutput, create_method
from ensemble_kd.methods import aekd
from ensemble_kd.methods.aekd import kd_logit_gradients
from ensemble_kd.solvers import capped_simplex
from ensemble_kd.solvers.capped_simplex import (capped_simplex_projection, gram_matrix, teacher_weights,
                                                weights_from_gram)
from ensemble_kd.methods.kd import teacher_kd_losses
from ensemble_kd.models import create, forward_with_taps
from ensemble_kd.models.tokens import tokens_to_map


# --------------------------------------------------------------------------- references
def exhaustive_min(G, C):
    """Exact reference: every partition of the weights into {at 0, at C, free}; on the free ones,
    the equality-constrained minimum from its KKT system; the least objective among feasible ones."""
    M, best, scale = len(G), np.inf, max(G.diagonal().max(), 1e-300)
    G = G / scale  # a sane scale for the linear solves; the objective is scaled back
    for states in itertools.product((-1, 0, 1), repeat=M):
        s = np.array(states)
        F_, U = np.flatnonzero(s == 0), np.flatnonzero(s == 1)
        a = np.zeros(M)
        a[U] = C
        rest = 1.0 - C * len(U)  # what the free weights must sum to, in [0, C·|F|]
        if not -1e-12 <= rest <= C * len(F_) + 1e-12:
            continue
        if len(F_) == 0:
            if abs(rest) > 1e-12:
                continue
        else:
            n = len(F_)
            K = np.zeros((n + 1, n + 1))
            K[:n, :n], K[:n, n], K[n, :n] = 2 * G[np.ix_(F_, F_)], 1.0, 1.0
            rhs = np.concatenate([-2 * G[np.ix_(F_, U)] @ a[U], [rest]])
            sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
            if np.linalg.norm(K @ sol - rhs) > 1e-9 * (1 + np.linalg.norm(rhs)):
                continue  # this face has no stationary point
            a[F_] = sol[:n]
        if a.min() >= -1e-10 and a.max() <= C + 1e-10 and abs(a.sum() - 1) <= 1e-10:
            best = min(best, float(a @ G @ a))
    return best * scale


def slsqp_min(G, C):
    """A general QP solver as a second reference; its answer is made exactly feasible by the
    projection (SLSQP may end slightly off the constraints, which can look "better")."""
    M = len(G)
    r = minimize(lambda a: a @ G @ a, np.full(M, 1.0 / M), jac=lambda a: 2 * G @ a, method="SLSQP",
                 bounds=[(0, C)] * M, options={"ftol": 1e-16, "maxiter": 500},
                 constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(M)}])
    x = capped_simplex_projection(r.x, C)
    return float(x @ G @ x)


def kkt_violation(G, a, C, tol=1e-12):
    """How far α is from the KKT conditions (0 at an exact optimum), on G scaled to max diagonal 1."""
    if G.diagonal().max() == 0:
        return 0.0
    g = (G / G.diagonal().max()) @ a
    lower, upper = a <= tol, a >= C - tol
    free = ~lower & ~upper
    if free.any():  # one ν: equal on the free weights, <= at 0, >= at C
        nu = g[free].mean()
        worst = g[free].max() - g[free].min()
    else:
        hi, lo = g[upper].max(initial=-np.inf), g[lower].min(initial=np.inf)
        if np.isinf(hi) or np.isinf(lo):
            return 0.0
        nu, worst = (hi + lo) / 2, max(hi - lo, 0.0)
    return max(worst, np.max(nu - g[lower], initial=0.0), np.max(g[upper] - nu, initial=0.0))


def random_instance(rng, M):
    """Gradients with the structures that break naive solvers, at scales from 1e-6 to 1e6."""
    D = int(rng.integers(1, 3 * M + 2))
    g = rng.standard_normal((M, D)) * 10.0 ** rng.uniform(-6, 6)
    kind = int(rng.integers(0, 8))
    if kind == 1:
        g[1] = g[0]  # two identical teachers
    elif kind == 2:
        g[-1] = -2.5 * g[0]  # opposite, colinear
    elif kind == 3:
        g[: M // 2] = 0  # zero gradients
    elif kind == 4:
        g += 5 * np.abs(g).max() * rng.standard_normal(D)  # a dominant shared direction
    elif kind == 5:
        g = np.outer(rng.standard_normal(M), rng.standard_normal(D))  # all colinear (rank 1)
    elif kind == 6:
        g[: M // 2 + 1] = g[0]  # nearly identical
        g[1:] += 1e-7 * np.abs(g).max() * rng.standard_normal((M - 1, D))
    C = float(rng.choice([1.0 / M, 1.0, rng.uniform(1.0 / M, 1.0), min(1.0, 1.5 / M)]))
    return g @ g.T, C


def check_feasible(a, C):
    assert np.all(np.isfinite(a))
    assert abs(a.sum() - 1.0) < 1e-12
    assert a.min() >= 0.0 and a.max() <= C + 1e-15


# --------------------------------------------------------------------------- the solver
def test_weights_match_an_exhaustive_active_set_search():
    rng = np.random.default_rng(0)
    for trial in range(250):
        G, C = random_instance(rng, int(rng.integers(2, 6)) if trial < 230 else 6)
        a = weights_from_gram(G, C)
        check_feasible(a, C)
        scale = max(G.diagonal().max(), 1e-300)
        assert (a @ G @ a - exhaustive_min(G, C)) / scale <= 1e-9, (trial, G, C, a)


def test_weights_match_a_general_qp_solver():
    rng = np.random.default_rng(1)
    for trial in range(100):
        G, C = random_instance(rng, int(rng.integers(2, 11)))
        G = G / max(G.diagonal().max(), 1e-300)  # SLSQP needs a sane scale; the weights do not
        a = weights_from_gram(G, C)
        check_feasible(a, C)
        ours, ref = float(a @ G @ a), slsqp_min(G, C)
        assert ours <= ref + 1e-10, (trial, ours, ref)  # never worse than the reference
        assert ours >= ref - 1e-6, (trial, ours, ref)  # and the reference agrees


def test_weights_satisfy_the_optimality_conditions_up_to_32_teachers():
    rng = np.random.default_rng(2)
    for trial in range(200):
        G, C = random_instance(rng, int(rng.integers(2, 33)))
        a = weights_from_gram(G, C)
        check_feasible(a, C)
        assert kkt_violation(G, a, C) <= 1e-9, (trial, C)


def test_c_one_over_m_gives_exactly_uniform_weights():
    rng = np.random.default_rng(3)
    for M in (1, 2, 3, 7):
        G = rng.standard_normal((M, 4))
        assert np.array_equal(weights_from_gram(G @ G.T, 1.0 / M), np.full(M, 1.0 / M))


def test_c_one_is_the_mgda_min_norm_point():
    # Two gradients: the min-norm point of the segment, α1 = clip((g2 - g1)·g2 / |g1 - g2|², 0, 1).
    g = np.array([[1.0, 0.0], [0.0, 1.0]])  # orthogonal unit vectors: the midpoint
    np.testing.assert_allclose(weights_from_gram(g @ g.T, 1.0), [0.5, 0.5], atol=1e-15)
    g = np.array([[1.0, 0.0], [2.0, 0.0]])  # the same direction: all on the shorter one
    np.testing.assert_allclose(weights_from_gram(g @ g.T, 1.0), [1.0, 0.0], atol=1e-15)
    g = np.array([[3.0, 1.0], [-1.0, 1.0]])  # (g2-g1)·g2 = 4+0 = 4, |g1-g2|² = 16: α = (0.25, 0.75)
    np.testing.assert_allclose(weights_from_gram(g @ g.T, 1.0), [0.25, 0.75], atol=1e-15)
    rng = np.random.default_rng(4)
    for _ in range(50):
        M = int(rng.integers(2, 6))
        g = rng.standard_normal((M, int(rng.integers(1, 8))))
        a = weights_from_gram(g @ g.T, 1.0)
        assert a @ (g @ g.T) @ a <= exhaustive_min(g @ g.T, 1.0) + 1e-12


@pytest.mark.parametrize("grads, C", [
    ([[1.0, 2.0], [1.0, 2.0]], 0.6),  # identical: every feasible point is optimal
    ([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], 0.5),  # all zero
    ([[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]], 1.0),  # colinear, opposite
    ([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]], 0.3),  # colinear, same direction, capped
    ([[5.0, -1.0]], 1.0),  # one teacher
    ([[1e-200, 0.0], [0.0, 1e-200]], 0.7),  # the Gram underflows to zero
    ([[1e150, 0.0], [0.0, 1e150]], 0.7),  # ... or is huge
])
def test_degenerate_gradients_give_finite_feasible_minimisers(grads, C):
    g = torch.tensor(grads, dtype=torch.float64)
    a = teacher_weights(gram_matrix(g), C)
    assert a.dtype == torch.float64 and a.shape == (len(grads),)
    check_feasible(a.numpy(), C)
    G = (g @ g.T).numpy()
    if len(grads) <= 6 and np.isfinite(G).all():
        assert a.numpy() @ G @ a.numpy() <= exhaustive_min(G, C) + 1e-12 * G.diagonal().max()


def test_colinear_opposite_gradients_cancel():
    g = torch.tensor([[1.0, 1.0], [-3.0, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(teacher_weights(gram_matrix(g), 1.0), torch.tensor([0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(teacher_weights(gram_matrix(g), 0.6), torch.tensor([0.6, 0.4], dtype=torch.float64))


def test_non_finite_gram_gives_uniform_weights_not_nan():
    G = np.array([[np.nan, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(weights_from_gram(G, 0.8), [0.5, 0.5])


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"C must be in \[1/M, 1\]"):
        weights_from_gram(np.eye(4), 0.2)
    with pytest.raises(ValueError, match=r"C must be in \[1/M, 1\]"):
        weights_from_gram(np.eye(2), 1.5)
    with pytest.raises(ValueError, match="square"):
        weights_from_gram(np.ones((2, 3)), 1.0)
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        gram_matrix(torch.ones(3))
    with pytest.raises(ValueError, match=r"\(S, M, M\)"):
        teacher_weights(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="solver must be one of host, device"):
        teacher_weights(torch.eye(2), 1.0, solver="gpu")


def test_teacher_weights_solve_a_stack_of_grams_on_either_solver_and_keep_the_device():
    torch.manual_seed(5)
    grams = torch.stack([gram_matrix(torch.randn(5, 40)) for _ in range(3)])
    a = teacher_weights(grams, 0.3)
    assert isinstance(a, torch.Tensor) and a.device == grams.device and a.shape == (3, 5)
    for G, row in zip(grams, a):
        np.testing.assert_allclose(row.numpy(), weights_from_gram(G.numpy(), 0.3), atol=1e-15)
    np.testing.assert_allclose(teacher_weights(grams, 0.3, solver="device").numpy(), a.numpy(), atol=1e-7)


def test_any_feasible_start_and_the_fallback_reach_the_same_optimum():
    rng = np.random.default_rng(6)
    for _ in range(40):  # the active-set method from random feasible starts
        G, C = random_instance(rng, int(rng.integers(2, 10)))
        G = G / max(G.diagonal().max(), 1e-300)
        a = weights_from_gram(G, C)
        start = capped_simplex_projection(rng.standard_normal(len(G)) * 3, C)
        b, certified = capped_simplex._active_set(G, C, capped_simplex._held(start, C))
        assert certified
        check_feasible(b, C)
        assert abs(b @ G @ b - a @ G @ a) <= 1e-12
    for _ in range(5):  # the projected-gradient fallback, on well-conditioned problems
        M = int(rng.integers(2, 8))
        g = rng.standard_normal((M, 2 * M))
        G, C = g @ g.T, float(rng.uniform(1.0 / M, 1.0))
        G = G / G.diagonal().max()
        a = weights_from_gram(G, C)
        b = capped_simplex._projected_gradient(G, C, np.full(M, 1.0 / M))
        check_feasible(b, C)
        assert abs(b @ G @ b - a @ G @ a) <= 1e-9


# --------------------------------------------------------------------------- the projection
def test_capped_simplex_projection_by_hand():
    np.testing.assert_allclose(capped_simplex_projection([3.0, 0.0, 0.0], 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(capped_simplex_projection([0.2, 0.3, 0.5], 1.0), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(capped_simplex_projection([1.0, 1.0], 0.6), [0.5, 0.5])
    np.testing.assert_allclose(capped_simplex_projection([2.0, 0.0, -5.0], 1.0), [1.0, 0.0, 0.0])
    out = capped_simplex_projection(torch.tensor([0.9, 0.1, 0.4]), 0.4)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.tensor([0.4, 0.2, 0.4], dtype=torch.float64))


def test_capped_simplex_projection_is_the_nearest_feasible_point():
    rng = np.random.default_rng(7)
    for _ in range(100):
        M = int(rng.integers(1, 12))
        v = rng.standard_normal(M) * 10.0 ** rng.uniform(-2, 2)
        C = float(rng.choice([1.0 / M, 1.0, rng.uniform(1.0 / M, 1.0)]))
        x = capped_simplex_projection(v, C)
        check_feasible(x, C)
        # KKT: x = clip(v - τ, 0, C) for one τ.
        free = (x > 1e-12) & (x < C - 1e-12)
        if free.any():
            tau = np.mean(v[free] - x[free])
            np.testing.assert_allclose(x, np.clip(v - tau, 0, C), atol=1e-12)
        # ... which is sufficient (the problem is convex); still, no random feasible point is nearer.
        others = np.stack([capped_simplex_projection(rng.standard_normal(M), C) for _ in range(20)])
        assert ((x - v) ** 2).sum() <= ((others - v) ** 2).sum(1).min() + 1e-12


# --------------------------------------------------------------------------- the method
def _outputs(seed=0, M=3, B=6, K=5):
    torch.manual_seed(seed)
    return torch.randn(B, K, requires_grad=True), torch.randn(M, B, K) * 2, torch.randint(0, K, (B,))


def _batch(y):
    return Batch(None, y, torch.arange(len(y)))


def test_analytic_logit_gradients_equal_autograd():
    z, zt, _ = _outputs(B=7, K=4)
    losses = teacher_kd_losses(z, zt, 3.0)
    analytic = kd_logit_gradients(z, zt, 3.0)
    for m in range(len(zt)):
        (auto,) = torch.autograd.grad(losses[m], z, retain_graph=True)
        torch.testing.assert_close(analytic[m], auto, atol=1e-7, rtol=1e-5)


def test_aekd_loss_weights_and_logs():
    z, zt, y = _outputs()
    method = create_method("aekd", C=1.0, temperature=4.0, ce_weight=0.5, kd_weight=0.9)
    out = method.loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    alpha = teacher_weights(gram_matrix(kd_logit_gradients(z, zt, 4.0)), 1.0).float()
    expected = 0.5 * F.cross_entropy(z, y) + 0.9 * (alpha * teacher_kd_losses(z, zt, 4.0)).sum()
    torch.testing.assert_close(out.loss, expected)
    assert set(out.logs) == {"ce", "kd", "loss", "alpha_0", "alpha_1", "alpha_2"}
    torch.testing.assert_close(torch.stack([out.logs[f"alpha_{i}"] for i in range(3)]), alpha)
    out.loss.backward()
    assert z.grad.abs().sum() > 0


def test_alpha_follows_c_and_c_one_over_m_is_aver():
    z, zt, y = _outputs(seed=1, M=4)
    logged = {}
    for C in (0.25, 0.3, 1.0):
        out = create_method("aekd", C=C).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
        logged[C] = torch.stack([out.logs[f"alpha_{i}"] for i in range(4)])
        assert logged[C].max() <= C + 1e-6
    assert torch.equal(logged[0.25], torch.full((4,), 0.25))
    assert logged[1.0].max() > 0.3  # the cap binds at C = 0.3
    assert not torch.allclose(logged[0.3], logged[1.0])
    assert not torch.allclose(logged[0.25], logged[1.0])
    # C = 1/M: the same gradient as AVER with alpha = a/(γ + a) scaled by (γ + a).
    z1 = z.detach().clone().requires_grad_(True)
    create_method("aekd", C=0.25).loss(_batch(y), StudentOutput(z1, {}), TeacherOutput(zt, {})).loss.backward()
    z2 = z.detach().clone().requires_grad_(True)
    (1.9 * create_method("aver", alpha=0.9 / 1.9).loss(
        _batch(y), StudentOutput(z2, {}), TeacherOutput(zt, {})).loss).backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_aekd_rejects_c_below_one_over_m_and_bad_options():
    z, zt, y = _outputs(M=4)
    with pytest.raises(ValueError, match="below 1/M"):
        create_method("aekd", C=0.2).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    for options, match in [({"C": 0}, "C"), ({"variant": "hints"}, "variant"),
                           ({"regressor_kernel": 5}, "regressor_kernel"), ({"kd_weight": -1}, "kd_weight"),
                           ({"variant": "features", "student_channels": 8}, "go together")]:
        with pytest.raises(ValueError, match=match):
            create_method("aekd", **options)


def _feature_setup(seed=0):
    torch.manual_seed(seed)
    student = create("small_cnn", num_classes=5, in_channels=1, width=0.25)
    members = [create("small_cnn", num_classes=5, in_channels=1, width=w) for w in (0.5, 0.25)]
    teachers = TeacherSet(members)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))
    return student, teachers, x, y


def _feature_loss(method, student, teachers, x, y):
    logits, taps = forward_with_taps(student, x, method.needs.student_taps)
    return method.loss(_batch(y), StudentOutput(logits, taps), teachers.outputs(x, method.needs))


def test_features_variant_gradients_reach_the_student_and_every_regressor():
    student, teachers, x, y = _feature_setup()
    # Student layer2 (4x4, 16 channels) -> teachers' layer3 (2x2; 64 and 32 channels): the
    # regressors change channels and the pooling changes the size.
    method = create_method("aekd", variant="features", student_tap="layer2", teacher_tap="layer3",
                           ce_weight=0.0, kd_weight=0.0, hint_weight=1.0, C=0.7)
    method.bind(student, teachers, x)
    assert method.needs.student_taps == ("layer2",) and method.needs.teacher_taps == ("layer3",)
    assert [r.conv.out_channels for r in method.regressors] == [64, 32]
    out = _feature_loss(method, student, teachers, x, y)
    assert {"hint", "hint_alpha_0", "hint_alpha_1", "alpha_0", "alpha_1"} <= set(out.logs)
    out.loss.backward()
    for r in method.regressors:  # the hint term is a graph tensor: every regressor learns
        for p in r.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert student.layer1[0][0].weight.grad.abs().sum() > 0  # through f_s into the backbone
    assert not student.layer3[1][0].weight.grad.any()  # after the tap: ce and kd weigh 0, nothing
    assert not any(p.grad is not None for p in teachers.parameters())


def test_hint_weights_use_each_hint_losss_own_gradient_at_the_student_feature():
    student, teachers, x, y = _feature_setup(seed=1)
    method = create_method("aekd", variant="features", regressor_kernel=3, C=1.0)
    method.bind(student, teachers, x)  # default taps: the last stages
    assert method.needs.student_taps == ("layer3",)
    logits, taps = forward_with_taps(student, x, ("layer3",))
    f_s = taps["layer3"]
    targets = teachers.outputs(x, method.needs).taps["layer3"]
    grads = []
    for r, f_t in zip(method.regressors, targets):  # one autograd call per teacher, the slow way
        h = aekd.hint_loss(r(f_s, f_t.shape[-2:]), f_t)
        grads.append(torch.autograd.grad(h, f_s, retain_graph=True)[0])
    expected = teacher_weights(gram_matrix(torch.stack(grads)), 1.0).float()
    out = method.loss(_batch(y), StudentOutput(logits, taps), TeacherOutput(teachers.member_logits(x),
                                                                            {"layer3": targets}))
    got = torch.stack([out.logs[f"hint_alpha_{i}"] for i in range(2)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_features_variant_binds_from_stage_channels_and_explains_a_missing_bind():
    student, teachers, x, y = _feature_setup()
    method = create_method("aekd", variant="features")
    with pytest.raises(ValueError, match="bind"):
        method.loss(_batch(y), StudentOutput(student(x), {}), teachers.outputs(x, method.needs))
    method.bind(student, teachers)  # no example input: the models' stage_channels
    assert [(r.conv.in_channels, r.conv.out_channels) for r in method.regressors] == [(32, 64), (32, 32)]
    given = create_method("aekd", variant="features", student_tap="layer3", teacher_tap="layer3",
                          student_channels=32, teacher_channels=[64, 32])
    assert len(list(given.parameters())) > 0  # owned before any optimizer is built
    assert torch.isfinite(_feature_loss(given, student, teachers, x, y).loss)


def test_features_variant_needs_a_tap_every_teacher_has():
    student = create("small_cnn", num_classes=5, in_channels=1)
    teachers = TeacherSet([create("small_cnn", num_classes=5, in_channels=1),
                           create("mlp", num_classes=5, in_channels=1)])
    with pytest.raises(ValueError, match="teacher 1 has no module 'layer3'"):
        create_method("aekd", variant="features").bind(student, teachers)



def test_tokens_become_the_map_of_the_patch_tokens_in_row_major_order():
    B, h, w, C = 2, 2, 3, 4
    tokens = torch.randn(B, 1 + h * w, C)  # a class token, then the patches row by row
    got = tokens_to_map(tokens, (1, (h, w)))
    assert got.shape == (B, C, h, w)
    for i, j in itertools.product(range(h), range(w)):
        torch.testing.assert_close(got[:, :, i, j], tokens[:, 1 + i * w + j], rtol=0, atol=0)
    square = torch.randn(B, 2 + 9, C)  # 2 prefix tokens at another input size than the 2x3 grid: 3x3
    torch.testing.assert_close(tokens_to_map(square, (2, (h, w))), square[:, 2:].reshape(B, 3, 3, C).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"8 tokens fit neither the model's 1 prefix tokens \+ 2x3 patch grid"):
        tokens_to_map(torch.randn(B, 8, C), (1, (h, w)))


class _TokenNet(torch.nn.Module):
    """A model whose `block` outputs tokens (B, N, C) but that has no known token layout."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.embed, self.block, self.head = torch.nn.Linear(1, 6), torch.nn.Identity(), torch.nn.Linear(6, num_classes)

    def forward(self, x):
        return self.head(self.block(self.embed(x.flatten(2).transpose(1, 2))).mean(1))


def test_features_variant_refuses_tokens_of_a_model_without_a_known_layout():
    _, teachers, x, _ = _feature_setup()
    method = create_method("aekd", variant="features", student_tap="block", teacher_tap="layer3")
    with pytest.raises(ValueError, match=r"^aekd \(features\): the student's tap 'block' gives shape \(2, 64, 6\); "
                                         r"a hint feature must be a map \(B, C, H, W\), a vector \(B, C\), or the "
                                         r"tokens \(B, N, C\) of a timm or torchvision VisionTransformer"):
        method.bind(_TokenNet(), teachers, x)


# --------------------------------------------------------------------------- in the engine
TINY = ["data.batch_size=512", "student.kwargs={width: 0.25}", "student.train.epochs=1",
        "student.train.log_every=1"]  # 3 steps


@pytest.fixture(scope="module")
def data():
    return pipeline.prepare_data(load_config(None, TINY + ["device=cpu"]))


@pytest.mark.parametrize("options", [{}, {"variant": "features", "C": 0.8}])
def test_aekd_trains_in_the_engine_and_logs_alpha(data, tmp_path, options):
    config = load_config(None, TINY)
    torch.manual_seed(0)
    spec = dict(num_classes=data.splits.num_classes, in_channels=data.splits.in_channels, width=0.25)
    teachers = TeacherSet([create("small_cnn", **spec), create("small_cnn", **spec)])
    model = pipeline.build_model(config.student, data)
    method = create_method("aekd", **options)
    trainer = Trainer(model, method, data.train_loader(data.config.data, seed=0), config.student.train, tmp_path,
                      device=data.device, seed=0, teachers=teachers)  # it binds the method
    assert all(id(p) in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]}
               for p in method.parameters())  # the regressors are trained
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "alpha_0" in r]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    assert all(abs(r["alpha_0"] + r["alpha_1"] - 1) < 1e-5 for r in steps)
    if options:
        assert all("hint_alpha_1" in r and np.isfinite(r["hint"]) for r in steps)
    assert "train_alpha_0" in records[-1]


@pytest.mark.parametrize("M", [2, 3, 5, 8])
def test_device_solver_finds_the_same_optimum_without_the_host(M):
    rng = np.random.default_rng(M)
    for trial in range(60 if M < 8 else 12):
        g = rng.standard_normal((M, int(rng.integers(1, 10))))
        if trial % 4 == 0:
            g[1] = g[0]  # identical teachers
        if trial % 5 == 0:
            g = g[:, :1] * rng.standard_normal((1, g.shape[1]))  # rank one, some opposite
        if trial % 9 == 0:
            g[:] = 0
        G = g @ g.T
        C = float(rng.uniform(1.0 / M, 1.0))
        exact = weights_from_gram(G, C)
        got = capped_simplex.weights_from_gram_on_device(torch.from_numpy(G), C).numpy()
        assert got.min() >= -1e-9 and got.max() <= C + 1e-7 and abs(got.sum() - 1) < 1e-9
        assert got @ G @ got <= exact @ G @ exact + 1e-9 * max(1.0, G.diagonal().max())
    batch = torch.from_numpy(np.stack([np.eye(M), np.ones((M, M))]))  # a batch keeps its shape
    assert capped_simplex.weights_from_gram_on_device(batch, 1.0).shape == (2, M)


def test_aekd_device_solver_gives_the_host_solvers_loss():
    z, zt, y = _outputs()
    host = create_method("aekd", C=0.7).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    device = create_method("aekd", C=0.7, solver="device").loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    torch.testing.assert_close(device.loss, host.loss, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="solver"):
        create_method("aekd", solver="gpu")


# --------------------------------------------------------------------------- the authors' batch-mean form
def _two_vector_min_norm(a, b, C):
    """min ||α a + (1-α) b|| over α in [1-C, C], by hand: α* = (b - a)·b / ||a - b||², clipped."""
    alpha = float(np.dot(b - a, b) / np.dot(a - b, a - b))
    alpha = min(max(alpha, 1.0 - C), C)
    return np.array([alpha, 1.0 - alpha])


def test_batch_reduction_weighs_the_batch_mean_gradients_by_hand():
    z, zt, y = _outputs(M=2, B=5, K=4)
    T = 4.0
    g = (T / 5) * (F.softmax(z.detach() / T, -1) - F.softmax(zt / T, -1))  # (M, B, K), the analytic gradient
    mean = g.mean(1).double().numpy()  # their find_optimal_svm: the mean over the batch, one K-vector a teacher
    expected = _two_vector_min_norm(mean[0], mean[1], 0.8)
    out = create_method("aekd", C=0.8, grad_reduction="batch").loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    np.testing.assert_allclose([float(out.logs["alpha_0"]), float(out.logs["alpha_1"])], expected, atol=1e-6)
    per_sample = create_method("aekd", C=0.8).loss(_batch(y), StudentOutput(z, {}), TeacherOutput(zt, {}))
    assert abs(float(per_sample.logs["alpha_0"]) - expected[0]) > 1e-3  # the two forms differ here


def test_batch_reduction_normalises_the_hint_gradients_as_the_authors():
    # batch means [3, 0] and [0, 1]: unit vectors are orthogonal -> 1/2 each; divided by the norms
    # (3 and 1) and summed to 1: [1/6, 1/2] / (2/3) = [1/4, 3/4]. The logit set is not normalised.
    hints = torch.tensor([[[3.0, 0.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (M=2, B=2, D=2)
    alphas = aekd.batch_mean_weights([hints, hints], 1.0, [False, True])
    torch.testing.assert_close(alphas[1], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(alphas[0], torch.tensor([0.1, 0.9], dtype=torch.float64))  # min-norm of [3,0],[0,1]
    with pytest.raises(ValueError, match="grad_reduction"):
        create_method("aekd", grad_reduction="mean")
