"""AE-KD: adaptive ensemble KD in gradient space (Du et al., NeurIPS 2020).

Each teacher m pulls the student along its own KD gradient g_m. AE-KD weighs the teachers
by the point of the "capped" convex hull of those gradients nearest the origin:

    α* = argmin ||Σ_m α_m g_m||²   subject to  Σ_m α_m = 1,  0 ≤ α_m ≤ C,

C in [1/M, 1]: C = 1/M forces uniform weights (AVER), C = 1 is the MGDA min-norm point.
Loss: γ·CE + a·Σ_m α_m ℓ_m (+ β·Σ_m α'_m h_m in the feature variant), α constants.

What g_m is. ℓ_m = T²·KL(p_m || p_s) averaged over the batch. Its gradient with respect
to the student logits is analytic, T·(p_s - p_m)/B per sample, so no backward pass is
needed; g_m is that (B, K) gradient flattened to B·K numbers ("the batch-mean logit
gradient": the gradient of the batch-mean loss at every logit of the batch, as the
authors' code takes it). Keeping the samples apart matters: summing over the batch
first would let teachers that disagree on different samples cancel out.

The solver. The public code runs a one-class SVM (LIBSVM) on the Gram matrix, which
returns non-finite weights on colinear gradients. Here the M x M Gram G = g gᵀ is formed
on the device in float64, copied to the host once (the step's one sync), and solved
exactly by a primal active-set method (`weights_from_gram`). It starts from the minimiser
on the plane Σα = 1 (the answer when it lies in the box, as it usually does for a few
teachers), else from that point's exact projection onto the capped simplex (which
usually holds the optimum's weights at 0 and C already). Each iteration minimises αᵀGα
on the current face, in the null space of the sum constraint; a singular reduced Hessian
(identical, colinear or zero gradients; any rank) gives a zero-curvature descent ray to
the next bound instead of a division by zero. It stops when the bound multipliers have
the right signs, which certifies the global minimum (the problem is convex). A few
iterations for M ≤ 32; a projected-gradient run, then the active-set finish from its
point, is the fallback should it ever cycle (never seen in 20 000 random degenerate
instances).

Feature variant (FitNets hints): one regressor per teacher, conv 1x1 (or 3x3) + BN, maps
the student's feature f_s to teacher m's channels, average-pooled to teacher m's spatial
size; h_m = ½·mean((f_m - r_m(f_s))²) over all elements (batch, channels, positions).
Its weights α' come from the gradients of h_m at the shared f_s, read in one autograd
call through the regressors only (the student's backbone is not traversed).

Under torch.distributed the Gram matrix is averaged over ranks before the solve, so every
rank uses the same weights, those of the global batch: with g_m the concatenation of the
per-sample gradients, the global Gram is proportional to the mean of the ranks' Grams
(equal per-rank batches), and the weights do not depend on the Gram's scale.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import all_reduce_mean
from ..metrics import eval_mode
from ..models import default_taps, forward_with_taps, resolve_module, unwrap
from .base import STAGE_TAPS, Method, MethodLoss, Needs, register_method
from .kd import check_temperature, teacher_kd_losses, teacher_logits_of

VARIANTS = ("logits", "features")
_TOL = 1e-12  # on the Gram scaled to max diagonal 1; weights are in [0, 1]


# --------------------------------------------------------------------------- the weights
def _check_cap(C, M: int) -> float:
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not np.isfinite(C):
        raise ValueError(f"C must be a number in [1/M, 1], got {C!r}")
    if not 1.0 / M - 1e-12 <= C <= 1.0 + 1e-12:
        raise ValueError(f"C must be in [1/M, 1] = [{1.0 / M:.6g}, 1] for M={M} teachers, got {C}; "
                         f"C < 1/M leaves no weights that sum to 1")
    return min(max(float(C), 1.0 / M), 1.0)


def capped_simplex_projection(v, C: float):
    """The Euclidean projection of v (M,) onto {x: Σx = 1, 0 ≤ x ≤ C}, exact.

    x = clip(v - τ, 0, C) with τ such that Σx = 1. The sum is piecewise linear and
    non-increasing in τ with breakpoints at v_i and v_i - C: sort them, find the segment
    where the sum crosses 1, and interpolate (exact, since the sum is linear there).
    Takes and returns a tensor or a NumPy array (computed in float64 on the host).
    """
    tensor = isinstance(v, torch.Tensor)
    x = v.detach().to("cpu", torch.float64).numpy() if tensor else np.asarray(v, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"v must be a non-empty finite vector, got shape {x.shape}")
    C = _check_cap(C, x.size)
    out = _project(x, C)
    return torch.from_numpy(out).to(v.device) if tensor else out


def _project(v: np.ndarray, C: float) -> np.ndarray:
    if C * v.size <= 1.0 + 1e-12:
        return np.full(v.size, 1.0 / v.size)  # the only feasible point
    breaks = np.sort(np.concatenate([v - C, v]))
    sums = np.clip(v[None, :] - breaks[:, None], 0.0, C).sum(1)  # C·M at the first break, 0 at the last
    k = max(int(np.count_nonzero(sums >= 1.0)) - 1, 0)  # the sums >= 1 are a prefix (non-increasing)
    tau = breaks[k]
    if sums[k] > 1.0:
        tau += (sums[k] - 1.0) / (sums[k] - sums[k + 1]) * (breaks[k + 1] - breaks[k])
    return np.clip(v - tau, 0.0, C)


def gram_matrix(grads: torch.Tensor) -> torch.Tensor:
    """(M, M) float64 Gram matrix of (M, ...) gradients, on their device."""
    g = grads.detach().reshape(grads.shape[0], -1).double()
    return g @ g.T


def teacher_weights(grads: torch.Tensor, C: float) -> torch.Tensor:
    """argmin_α ||Σ α_m g_m||² s.t. Σα = 1, 0 ≤ α ≤ C, for (M, D) gradients; (M,) float64.

    Exact (see `weights_from_gram`); the solve costs one device-to-host copy of the Gram.
    """
    if grads.dim() < 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be (M, D) with M >= 1, got shape {tuple(grads.shape)}")
    return weights_from_gram(gram_matrix(grads), C)


def weights_from_gram(gram, C: float):
    """argmin_α αᵀGα s.t. Σα = 1, 0 ≤ α ≤ C, for a PSD (M, M) Gram matrix G; exact.

    Tensor in, float64 tensor on the same device out (one copy each way); a NumPy array in,
    an array out. C must lie in [1/M, 1]. Degenerate G (zero, identical or colinear
    gradients, any rank) gives a feasible minimiser; a non-finite G (the loss is already
    non-finite, which the trainer reports) gives uniform weights rather than NaN.
    """
    tensor = isinstance(gram, torch.Tensor)
    G = gram.detach().to("cpu", torch.float64).numpy() if tensor else np.asarray(gram, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"the Gram matrix must be square (M, M) with M >= 1, got shape {G.shape}")
    alpha = _min_norm_weights(G, _check_cap(C, G.shape[0]))
    return torch.from_numpy(alpha).to(gram.device) if tensor else alpha


def _min_norm_weights(G: np.ndarray, C: float) -> np.ndarray:
    M = G.shape[0]
    uniform = np.full(M, 1.0 / M)
    if M == 1 or C * M <= 1.0 + 1e-12 or not np.all(np.isfinite(G)):
        return uniform  # M = 1 or C = 1/M: the only feasible point
    G = 0.5 * (G + G.T)
    scale = float(np.max(np.diag(G)))  # |G_ij| <= max diagonal for a PSD matrix
    if not scale > 0.0:
        return uniform  # all gradients zero: every feasible point is optimal
    G = G / scale
    # Start from the minimiser on the plane Σα = 1. Inside the box it is the optimum (the usual
    # case for a few teachers); else its projection onto the capped simplex has, usually, the
    # optimum's weights at 0 and C, which saves the active-set walk from the uniform point
    # (any feasible start is correct).
    step, full = _face_step(G, G @ uniform)
    if full == 1.0:
        plane_min = uniform + step
        if plane_min.min() >= 0.0 and plane_min.max() <= C:
            if np.ptp(G @ plane_min) <= _TOL:
                return plane_min
            start = plane_min, np.zeros(M, dtype=np.int8)
        else:
            start = _held(_project(plane_min, C), C)
    else:
        start = uniform, np.zeros(M, dtype=np.int8)
    alpha, converged = _active_set(G, C, start)
    if not converged:  # cycling (never seen in tests): approach the optimum, then finish exactly
        near = _projected_gradient(G, C, alpha)
        alpha, converged = _active_set(G, C, _held(near, C))
        if not converged or near @ G @ near < alpha @ G @ alpha:
            alpha = near
    return alpha


@lru_cache(maxsize=64)
def _helmert(n: int) -> np.ndarray:
    """(n, n-1) orthonormal basis of {p in R^n: Σp = 0}."""
    Z = np.zeros((n, n - 1))
    for k in range(1, n):
        Z[:k, k - 1] = 1.0
        Z[k, k - 1] = -float(k)
        Z[:, k - 1] /= np.sqrt(k * (k + 1.0))
    Z.flags.writeable = False
    return Z


def _active_set(G: np.ndarray, C: float, start: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, bool]:
    """Primal active-set method from a feasible (α, held weights); returns (α, certified optimal)."""
    M = G.shape[0]
    alpha, state = start[0].copy(), start[1].copy()
    for _ in range(20 * M + 50):
        free = np.flatnonzero(state == 0)  # never empty: a bound is added only when 2+ are free
        grad = G @ alpha  # half the objective's gradient
        # Equal gradients on the free weights: the minimum of this face (the problem is convex).
        if np.ptp(grad[free]) > _TOL:
            step, full = _face_step(G[np.ix_(free, free)], grad[free])
            if np.max(np.abs(step)) > _TOL:
                a = alpha[free]
                room = np.full(free.size, np.inf)
                down, up = step < 0, step > 0
                room[down] = a[down] / -step[down]
                room[up] = (C - a[up]) / step[up]
                j = int(np.argmin(room))
                t = min(full, float(room[j]))
                alpha[free] = a + t * step
                if t < full:  # blocked: hold that weight at its bound
                    i = free[j]
                    alpha[i], state[i] = (0.0, -1) if step[j] < 0 else (C, 1)
                continue
        # Optimal iff no held weight gains from moving, with ν the free weights' gradient:
        # grad_i >= ν where α_i = 0 and grad_i <= ν where α_i = C (the KKT conditions).
        nu = grad[free].mean()
        gain = np.where(state == -1, nu - grad, np.where(state == 1, grad - nu, -np.inf))
        i = int(np.argmax(gain))
        if gain[i] <= _TOL:
            return _tidy(alpha, state, C), True
        state[i] = 0
    return alpha, False


def _held(alpha: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """A feasible α and its weights on a bound held there, keeping one free (it may sit on its bound)."""
    state = np.zeros(alpha.size, dtype=np.int8)
    state[alpha <= 0.0] = -1
    state[alpha >= C] = 1
    if not np.any(state == 0):
        state[0] = 0
    return alpha, state


def _face_step(G_ff: np.ndarray, grad_f: np.ndarray) -> tuple[np.ndarray, float]:
    """Step on the free weights keeping their sum: (step, largest useful step length).

    Newton step to the face's minimiser (length 1) when the reduced gradient lies in the
    reduced Hessian's range; otherwise a descent ray with zero curvature, followed until a
    bound blocks it (length inf; the box is bounded). A well-conditioned reduced Hessian
    (the usual case) takes a Cholesky check and one solve; the eigendecomposition is for
    the singular or nearly singular ones.
    """
    Z = _helmert(G_ff.shape[0])
    H = Z.T @ G_ff @ Z
    r = Z.T @ grad_f
    try:
        d = np.diag(np.linalg.cholesky(H))
        if d.min() > 1e-6 * d.max():  # condition number below 1e12
            return -(Z @ np.linalg.solve(H, r)), 1.0
    except np.linalg.LinAlgError:
        pass
    w, V = np.linalg.eigh(H)
    r = V.T @ r
    flat = w <= _TOL * max(1.0, w[-1])  # G is PSD: smaller eigenvalues are rounding
    if np.linalg.norm(r[flat]) > _TOL:  # only its direction matters: scale it to max 1
        ray = -(Z @ (V[:, flat] @ r[flat]))
        return ray / np.max(np.abs(ray)), np.inf
    curved = ~flat
    return -(Z @ (V[:, curved] @ (r[curved] / w[curved]))), 1.0


def _tidy(alpha: np.ndarray, state: np.ndarray, C: float) -> np.ndarray:
    """Clip rounding outside [0, C] and put the sum back to 1 on the free weights."""
    alpha = np.clip(alpha, 0.0, C)
    free = state == 0
    alpha[free] += (1.0 - alpha.sum()) / np.count_nonzero(free)
    return np.clip(alpha, 0.0, C)


def _projected_gradient(G: np.ndarray, C: float, start: np.ndarray, iters: int = 3000) -> np.ndarray:
    """FISTA with restarts and the exact projection: the fallback, slower but never stuck."""
    L = 2.0 * float(np.linalg.eigvalsh(G)[-1])
    x = _project(start, C)
    if not L > 0.0:
        return x
    y, t, fx = x.copy(), 1.0, float(x @ G @ x)
    for _ in range(iters):
        x_new = _project(y - (2.0 / L) * (G @ y), C)
        f_new = float(x_new @ G @ x_new)
        if f_new > fx:  # restart the momentum
            y, t = x.copy(), 1.0
            continue
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        done = np.max(np.abs(x_new - x)) <= 1e-14
        x, t, fx = x_new, t_new, f_new
        if done:
            break
    return x


# --------------------------------------------------------------------------- the weights, on the device
DEVICE_SOLVER_MAX_M = 8  # 3^8 = 6561 small systems; beyond that the host solver


@lru_cache(maxsize=16)
def _faces(M: int) -> np.ndarray:
    """(F, M) int8: every assignment of each weight to 0 (held at 0), 1 (held at C) or 2 (free)
    with at least one free weight."""
    grid = np.array(np.meshgrid(*[np.arange(3)] * M, indexing="ij")).reshape(M, -1).T.astype(np.int8)
    return grid[(grid == 2).any(1)]


def weights_from_gram_on_device(gram: torch.Tensor, C: float) -> torch.Tensor:
    """The same exact minimiser as `weights_from_gram`, computed where `gram` lives, with no copy to
    the host: every face of the capped simplex (each weight at 0, at C or free) is solved at once as
    a batch of small KKT systems, and the feasible solution with the least objective is kept. The
    optimum lies on a face whose KKT system is nonsingular (from an optimum with a singular
    reduced Hessian, a zero-curvature direction leads to a bound, and to a smaller face), so the
    singular faces of degenerate gradients are skipped. A few batched kernels, M <= 8.
    (B, M, M) or (M, M) in, float64 weights of the same batch shape out."""
    single = gram.dim() == 2
    G = gram.detach().double().reshape(-1, *gram.shape[-2:])
    B, M = G.shape[0], G.shape[-1]
    if M > DEVICE_SOLVER_MAX_M:
        raise ValueError(f"the device solver enumerates 3^M faces; M={M} > {DEVICE_SOLVER_MAX_M}: use the host solver")
    C = _check_cap(C, M)
    if M == 1 or C * M <= 1.0 + 1e-12:
        out = torch.full((B, M), 1.0 / M, dtype=torch.float64, device=G.device)
        return out[0] if single else out
    G = 0.5 * (G + G.transpose(-1, -2))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)[:, None, None]
    G = G / scale  # the weights do not depend on the scale; zero gradients stay zero
    faces = torch.as_tensor(_faces(M), device=G.device)  # (F, M)
    free = faces == 2
    held = (faces == 1).double() * C  # values of the held weights, in float64 (float32 would miss the cap)
    F_ = faces.shape[0]
    # KKT system per (batch, face): rows of free i: (G α)_i - ν = 0; rows of held i: α_i = v_i; Σα = 1.
    A = torch.zeros(B, F_, M + 1, M + 1, dtype=torch.float64, device=G.device)
    A[..., :M, :M] = torch.where(free[None, :, :, None], G[:, None], torch.eye(M, dtype=torch.float64,
                                                                               device=G.device)[None, None])
    A[..., :M, M] = -free.double()[None]
    A[..., M, :M] = 1.0
    rhs = torch.zeros(B, F_, M + 1, dtype=torch.float64, device=G.device)
    rhs[..., :M] = held[None]  # 0 on the free rows
    rhs[..., M] = 1.0
    solution, info = torch.linalg.solve_ex(A, rhs)  # LU, batched; a singular face reports info != 0
    alpha = solution[..., :M]  # (B, F, M)
    tol = 1e-9
    ok = (info == 0) & torch.isfinite(alpha).all(-1)
    ok &= ((alpha >= -tol) & (alpha <= C + tol)).all(-1) & ((alpha.sum(-1) - 1).abs() <= 1e-7)
    objective = torch.einsum("bfi,bij,bfj->bf", alpha, G, alpha)
    objective = torch.where(ok, objective, torch.full_like(objective, float("inf")))
    best = objective.argmin(-1)  # the uniform point is feasible, so some face always is
    out = alpha[torch.arange(B, device=G.device), best].clamp(0.0, C)
    out = out / out.sum(-1, keepdim=True)
    return out[0] if single else out


# --------------------------------------------------------------------------- gradients
def kd_logit_gradients(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """(M, B, K) gradients of each teacher's batch-mean KD loss T²·KL(p_m || p_s) with respect
    to the student logits: T·(p_s - p_m)/B. (d/dz of -Σ p_m log softmax(z/T) is (p_s - p_m)/T.)"""
    T = temperature
    p_s = F.softmax(student_logits.detach().float() / T, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / T, dim=-1)
    return (T / student_logits.shape[0]) * (p_s - p_t)


def hint_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½·mean((target - prediction)²) over every element, in float32."""
    return 0.5 * (target.float() - prediction.float()).pow(2).mean()


class Regressor(nn.Module):
    """Conv (1x1 or 3x3) + BN from student to teacher channels, pooled to the teacher's H x W.

    (B, C) features are treated as (B, C, 1, 1): the conv is then a linear layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = self.bn(self.conv(_as_map(x)))
        return out if tuple(out.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(out, size)


def _as_map(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[:, :, None, None]
    raise ValueError(f"a hint feature must be (B, C, H, W) or (B, C), got shape {tuple(x.shape)}")


def _last_stage(model: nn.Module, who: str, option: str) -> str:
    try:
        return default_taps(model)[-2]
    except (ValueError, IndexError):
        raise ValueError(f"aekd (features): the {who} has no tap_points; set the option '{option}' "
                         f"to a module path") from None


def _channels(model: nn.Module, path: str, example_x, who: str) -> int:
    """The channel count of the output at `path`: from a forward pass on `example_x` when
    given (in eval mode, no grad, so BN statistics stay untouched), else from the model's
    stage_channels."""
    if example_x is not None:
        with eval_mode(model), torch.no_grad():  # the module inside DDP: its forward would be a collective
            _, taps = forward_with_taps(unwrap(model), example_x[:2], (path,))
        return int(_as_map(taps[path]).shape[1])
    inner = unwrap(model)
    points, channels = getattr(inner, "tap_points", None), getattr(inner, "stage_channels", None)
    if points is not None and channels is not None and path in points:
        return int(channels[list(points).index(path)])
    raise ValueError(f"aekd (features): cannot tell the channels of the {who}'s '{path}'; pass "
                     f"example_x to bind(), or the options student_channels and teacher_channels")


# --------------------------------------------------------------------------- the method
@register_method("aekd")
class AEKD(Method):
    """γ·CE + a·Σ α_m ℓ_m [+ β·Σ α'_m h_m], weights from the min-norm point of the gradients.

    Options: C (cap, in [1/M, 1]), temperature T, ce_weight γ, kd_weight a, variant
    ("logits" or "features"), solver ("host": the active-set method, one copy of the Gram per
    step; "device": the same optimum from every face at once where the Gram is, for M <= 8); for
    features: hint_weight β, student_tap and teacher_tap (module paths; default the last stage),
    regressor_kernel (1 or 3), and optionally student_channels / teacher_channels (one per
    teacher) to build the regressors without bind(). The feature variant owns one regressor per teacher; the engine calls
    `bind(student, teachers, example_x)` once before building the optimizer.
    """

    def __init__(self, C: float = 0.6, temperature: float = 4.0, ce_weight: float = 1.0,
                 kd_weight: float = 0.9, variant: str = "logits", hint_weight: float = 1.0,
                 student_tap: str | None = None, teacher_tap: str | None = None,
                 regressor_kernel: int = 1, student_channels: int | None = None,
                 teacher_channels: list[int] | None = None, solver: str = "host"):
        super().__init__()
        if solver not in ("host", "device"):
            raise ValueError(f"aekd option solver must be host or device, got {solver!r}")
        self.solver = solver
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not 0.0 < C <= 1.0:
            raise ValueError(f"aekd option C must be in (0, 1] (and at least 1/M), got {C!r}")
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("hint_weight", hint_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"aekd option {name} must be a number >= 0, got {value!r}")
        if variant not in VARIANTS:
            raise ValueError(f"aekd option variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if regressor_kernel not in (1, 3):
            raise ValueError(f"aekd option regressor_kernel must be 1 or 3, got {regressor_kernel!r}")
        for name, value in (("student_tap", student_tap), ("teacher_tap", teacher_tap)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"aekd option {name} must be a module path string, got {value!r}")
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError("aekd options student_channels and teacher_channels go together")
        self.C, self.temperature = float(C), check_temperature(temperature)
        self.ce_weight, self.kd_weight, self.hint_weight = float(ce_weight), float(kd_weight), float(hint_weight)
        self.variant, self.kernel = variant, regressor_kernel
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.regressors = nn.ModuleList()
        self.needs = Needs(teacher_logits=True)
        if variant == "features" and student_channels is not None:
            if isinstance(teacher_channels, int) or not all(isinstance(c, int) and c > 0 for c in teacher_channels):
                raise ValueError(f"aekd option teacher_channels must be a list of channel counts, one per "
                                 f"teacher, got {teacher_channels!r}")
            self._build(int(student_channels), [int(c) for c in teacher_channels])
        self._set_needs()

    # ------------------------------------------------------------------ setup
    def _build(self, student_channels: int, teacher_channels: list[int]) -> None:
        self.regressors = nn.ModuleList(Regressor(student_channels, c, self.kernel) for c in teacher_channels)

    def _set_needs(self) -> None:
        if self.variant == "features":  # unset taps: the last stage, resolved at bind
            self.needs = Needs(teacher_logits=True, teacher_taps=(self.teacher_tap or STAGE_TAPS,),
                               student_taps=(self.student_tap or STAGE_TAPS,))

    def bind(self, student: nn.Module, teachers=None, example_x: torch.Tensor | None = None) -> None:
        """Resolve the taps and build the regressors (features variant; a no-op for logits)."""
        if self.variant != "features":
            return
        if teachers is None:
            raise ValueError("aekd (features) needs the teachers to build its regressors")
        if not hasattr(teachers, "members") and not isinstance(teachers, (list, tuple, nn.ModuleList)):
            raise ValueError("aekd (features) needs teacher taps, which a teacher cache does not hold; "
                             "unset teachers.cache to run the teachers online")
        members = list(getattr(teachers, "members", teachers))
        self.student_tap = self.student_tap or _last_stage(student, "student", "student_tap")
        self.teacher_tap = self.teacher_tap or _last_stage(members[0], "first teacher", "teacher_tap")
        resolve_module(student, self.student_tap)
        for i, m in enumerate(members):
            try:
                resolve_module(m, self.teacher_tap)
            except ValueError as err:
                raise ValueError(f"aekd (features): teacher {i} has no module '{self.teacher_tap}'; "
                                 f"every teacher needs it: set teacher_tap to a path they share ({err})") from None
        c_s = _channels(student, self.student_tap, example_x, "student")
        c_t = [_channels(m, self.teacher_tap, example_x, f"teacher {i}") for i, m in enumerate(members)]
        built = [(r.conv.in_channels, r.conv.out_channels) for r in self.regressors]
        if built != [(c_s, c) for c in c_t]:
            if built:
                raise ValueError(f"aekd (features): the regressors were built for (student, teacher) "
                                 f"channels {built}, but the models have {[(c_s, c) for c in c_t]}")
            self._build(c_s, c_t)
        device = next((p.device for p in student.parameters()), None)
        if device is not None:
            self.regressors.to(device)
        self._set_needs()

    # ------------------------------------------------------------------ loss
    def loss(self, batch, student, teachers) -> MethodLoss:
        z_t = teacher_logits_of(teachers, "aekd")
        M = z_t.shape[0]
        if not self.C >= 1.0 / M - 1e-12:
            raise ValueError(f"aekd option C={self.C} is below 1/M = {1.0 / M:.4g} for {M} teachers; "
                             f"use C in [1/M, 1] (C = 1/M gives uniform weights)")
        z_s = student.logits
        ce = F.cross_entropy(z_s.float(), batch.y)
        kd_terms = teacher_kd_losses(z_s, z_t, self.temperature)  # (M,)
        grads = [kd_logit_gradients(z_s, z_t, self.temperature)]
        if self.variant == "features":
            hints, hint_grads = self._hints(student, teachers, M)
            grads.append(hint_grads)
        alphas = self._weights(grads, M)  # (1 or 2, M), constants
        kd = (alphas[0].to(kd_terms.dtype) * kd_terms).sum()
        loss = self.ce_weight * ce + self.kd_weight * kd
        logs = {"ce": ce.detach(), "kd": kd.detach()}
        logs.update({f"alpha_{i}": a for i, a in enumerate(alphas[0])})
        if self.variant == "features":
            hint = (alphas[1].to(hints.dtype) * hints).sum()
            loss = loss + self.hint_weight * hint
            logs["hint"] = hint.detach()
            logs.update({f"hint_alpha_{i}": a for i, a in enumerate(alphas[1])})
        logs["loss"] = loss.detach()
        return MethodLoss(loss, logs)

    def _weights(self, grads: list[torch.Tensor], M: int) -> torch.Tensor:
        """(len(grads), M) float32 weights on the device: one all-reduce of the Gram matrices
        under torch.distributed, one copy to the host and one back, however many sets."""
        grams = all_reduce_mean(torch.stack([gram_matrix(g) for g in grads]))  # same alpha on every rank
        C = _check_cap(self.C, M)
        if self.solver == "device" and M <= DEVICE_SOLVER_MAX_M:  # no host round-trip at all
            return weights_from_gram_on_device(grams, C).float()
        host = grams.to("cpu").numpy()  # the step's one sync
        alphas = np.stack([_min_norm_weights(G, C) for G in host])
        return torch.from_numpy(alphas).to(device=grams.device, dtype=torch.float32)

    def _hints(self, student, teachers, M: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M,) hint losses h_m (graph tensors) and (M, ...) their gradients at f_s."""
        if not self.regressors or self.student_tap is None or self.teacher_tap is None:
            raise ValueError("aekd (features) has no regressors yet: call method.bind(student, teachers, "
                             "example_x) before building the optimizer (the engine does), or pass the "
                             "options student_tap, teacher_tap, student_channels and teacher_channels")
        if len(self.regressors) != M:
            raise ValueError(f"aekd (features) has {len(self.regressors)} regressors but got {M} teachers")
        if self.student_tap not in student.taps or self.teacher_tap not in teachers.taps:
            raise ValueError(f"aekd (features) needs the student tap '{self.student_tap}' and the teacher "
                             f"tap '{self.teacher_tap}' in the outputs it was given")
        f_s = student.taps[self.student_tap]
        targets = [_as_map(f).detach() for f in teachers.taps[self.teacher_tap]]
        with torch.enable_grad():
            src = f_s if f_s.requires_grad else f_s.detach().requires_grad_()
            # One view of f_s per regressor: the gradient at view m is the gradient of h_m at f_s.
            inputs = [src.view_as(src) for _ in range(M)]
            hints = torch.stack([hint_loss(r(x, f.shape[-2:]), f)
                                 for r, x, f in zip(self.regressors, inputs, targets)])
            grads = torch.autograd.grad(hints.sum(), inputs, retain_graph=True)
        return hints, torch.stack(grads)
