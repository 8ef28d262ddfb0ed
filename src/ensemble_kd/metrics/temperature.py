"""Temperature scaling: the T > 0 that minimises the NLL of softmax(logits / T)."""

from __future__ import annotations

import math

import torch

from ._checks import EPS, check_logits_labels

# Search range for T. The mean NLL is convex in the inverse temperature b = 1/T (a
# mean of log-sum-exp of linear functions), so its derivative in b is increasing and
# a bracketed Newton iteration on it finds the global minimum inside the range.
T_MIN, T_MAX = 1e-2, 1e2
_RTOL = 1e-10  # stop when the step or the bracket is this small relative to b
_MAX_ITER = 100


def probs_to_logits(probs) -> torch.Tensor:
    """log(probs) with probabilities clamped at 1e-12: logits for an ensemble's mean probabilities."""
    probs = torch.as_tensor(probs)
    return probs.clamp_min(EPS).log()


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shift each row to max 0 (softmax(z/T) is unchanged) and replace -inf by a finite floor.

    The floor is log(1e-12) or the row's smallest finite value if that is lower, so the
    order of the classes is kept and finite logits are never changed (up to the shift).
    """
    shifted = logits - logits.max(dim=1, keepdim=True).values
    neg_inf = torch.isneginf(shifted)
    if not bool(neg_inf.any()):
        return shifted
    row_min = torch.where(neg_inf, torch.zeros_like(shifted), shifted).min(dim=1, keepdim=True).values
    floor = row_min.clamp_max(math.log(EPS))
    return torch.where(neg_inf, floor.expand_as(shifted), shifted)


def _nll_slope(z: torch.Tensor, z_true: torch.Tensor, b: float) -> tuple[float, float]:
    """First and second derivative in b of mean_i [logsumexp(b z_i) - b z_i,y]."""
    p = torch.softmax(b * z, dim=1)
    mean_z = (p * z).sum(dim=1)
    var_z = (p * (z - mean_z[:, None]) ** 2).sum(dim=1)
    return float((mean_z - z_true).mean()), float(var_z.mean())


def temperature_at_bound(temperature: float) -> bool:
    """True when fit_temperature returned a bound of its range: the optimum lies outside it.

    Then temperature scaling is not identifiable and the calibrated test figures depend on
    the bound: at T_MIN the validation NLL keeps falling as T -> 0 (every validation sample
    right with a margin), at T_MAX as T grows (predictions no better than uniform).
    fit_temperature returns a bound only then: its Newton iterates stay strictly inside
    the bracket.
    """
    return temperature in (T_MIN, T_MAX)


def fit_temperature(logits, labels) -> float:
    """The temperature T in [0.01, 100] minimising mean NLL of softmax(logits / T), in float64.

    Newton's method on the derivative of the NLL in b = 1/T, kept inside a bracket that
    shrinks every step (a bisection step on log b whenever Newton would leave it), to a
    relative precision of about 1e-10; usually under ten passes over the logits. -inf
    logits (log of a zero probability) are replaced by a finite floor (see finite_logits).
    If the optimum lies outside the range the nearest bound is returned, e.g. 0.01 when
    every validation sample is classified correctly with a margin (see temperature_at_bound).
    """
    logits, labels = check_logits_labels(logits, labels)
    z = finite_logits(logits.double())
    z_true = z.gather(1, labels[:, None]).squeeze(1)
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    if _nll_slope(z, z_true, hi)[0] <= 0:  # NLL still falls as T drops below T_MIN
        return T_MIN
    if _nll_slope(z, z_true, lo)[0] >= 0:  # NLL still falls as T rises above T_MAX
        return T_MAX
    b = 1.0
    for _ in range(_MAX_ITER):
        slope, curvature = _nll_slope(z, z_true, b)
        if slope == 0:
            break
        if slope > 0:
            hi = b
        else:
            lo = b
        step = slope / curvature if curvature > 0 else math.inf
        if abs(step) <= _RTOL * b or hi - lo <= _RTOL * lo:
            break
        b -= step
        if not lo < b < hi:  # Newton left the bracket: bisect it (geometrically, it spans decades)
            b = math.sqrt(lo * hi)
    return float(1.0 / b)
