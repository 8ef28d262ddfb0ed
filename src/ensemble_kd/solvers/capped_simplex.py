"""The weights of AE-KD (Du et al., NeurIPS 2020): the point of the capped simplex nearest the
origin in the span of the teachers' gradients,

    α* = argmin ||Σ_m α_m g_m||²   subject to  Σ_m α_m = 1,  0 ≤ α_m ≤ C,

C in [1/M, 1]: C = 1/M forces uniform weights, C = 1 is the MGDA min-norm point. Everything
here works on the M x M Gram matrix G = g gᵀ, so callers may average it over ranks first.

Two exact solvers, one answer (`teacher_weights` picks one; "auto", the default, takes the device
solver where G is on an accelerator and the host solver where it is on the CPU, see `_resolve`):
- host: G is copied to the host once and solved by a primal active-set method
  (`weights_from_gram`). It starts from the minimiser on the plane Σα = 1 (the answer when it
  lies in the box, as it usually does for a few teachers), else from that point's exact
  projection onto the capped simplex (`capped_simplex_projection`, which usually holds the
  optimum's weights at 0 and C already). Each iteration minimises αᵀGα on the current face, in
  the null space of the sum constraint; a singular reduced Hessian (identical, colinear or zero
  gradients; any rank) gives a zero-curvature descent ray to the next bound instead of a
  division by zero. It stops when the bound multipliers have the right signs, which certifies
  the global minimum (the problem is convex). A few iterations for M ≤ 32; a projected-gradient
  run (FISTA with the exact projection), then the active-set finish from its point, is the
  fallback should it ever cycle (never seen in 20 000 random degenerate instances).
- device: every face of the capped simplex solved at once as a batch of small KKT systems where
  G lives, no copy to the host (`weights_from_gram_on_device`, M ≤ 8).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SOLVERS = ("host", "device", "auto")
_TOL = 1e-12  # on the Gram scaled to max diagonal 1; weights are in [0, 1]

def check_cap(C, M: int) -> float:
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
    C = check_cap(C, x.size)
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
    if grads.dim() < 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be (M, D) with M >= 1, got shape {tuple(grads.shape)}")
    g = grads.detach().reshape(grads.shape[0], -1).double()
    return g @ g.T



def _resolve(solver: str, gram: torch.Tensor) -> str:
    """auto: the device solver on an accelerator, where copying G to the host would make the host wait
    for all the step's queued work (a sync every step); the host solver on the CPU, where there is
    no copy to wait for and the active-set method is faster (measured on this CPU, 2 stacked Grams:
    ~150 µs for M = 2..8 against 410 µs (M = 2), 690 µs (M = 5) and 19 ms (M = 8) for enumerating faces)."""
    if solver != "auto":
        return solver
    return "host" if gram.device.type == "cpu" else "device"


def teacher_weights(gram: torch.Tensor, C: float, *, solver: str = "auto") -> torch.Tensor:
    """argmin_α αᵀGα s.t. Σα = 1, 0 ≤ α ≤ C for (M, M) or a stack (S, M, M) of Gram matrices:
    float64 weights (M,) or (S, M) on the Gram's device. `solver`: "host" (one copy each way,
    however many in the stack), "device" (no copy; M ≤ 8, beyond that the host solver) or "auto"
    (device on an accelerator, host on the CPU)."""
    if solver not in SOLVERS:
        raise ValueError(f"the capped-simplex solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if gram.dim() not in (2, 3) or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] == 0:
        raise ValueError(f"teacher_weights takes (M, M) or (S, M, M) Gram matrices, got shape {tuple(gram.shape)}")
    M = gram.shape[-1]
    C = check_cap(C, M)
    if _resolve(solver, gram) == "device" and M <= DEVICE_SOLVER_MAX_M:
        return weights_from_gram_on_device(gram, C)
    host = gram.detach().to("cpu", torch.float64).numpy()
    alphas = np.stack([_min_norm_weights(G, C) for G in host.reshape(-1, M, M)]).reshape(host.shape[:-1])
    return torch.from_numpy(alphas).to(gram.device)


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
    alpha = _min_norm_weights(G, check_cap(C, G.shape[0]))
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


@lru_cache(maxsize=32)
def _faces_on(M: int, device: torch.device) -> torch.Tensor:
    """The faces on `device`, copied once (non_blocking: a pageable source is staged, no stream waited on)."""
    return torch.from_numpy(_faces(M)).to(device, non_blocking=True)


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
    C = check_cap(C, M)
    if M == 1 or C * M <= 1.0 + 1e-12:
        out = torch.full((B, M), 1.0 / M, dtype=torch.float64, device=G.device)
        return out[0] if single else out
    G = 0.5 * (G + G.transpose(-1, -2))
    scale = G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)[:, None, None]
    G = G / scale  # the weights do not depend on the scale; zero gradients stay zero
    faces = _faces_on(M, G.device)  # (F, M)
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
