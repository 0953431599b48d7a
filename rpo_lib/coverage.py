"""Coverage coefficients of Song et al. (global, KL-ball, linear) and Liu et al. (partial), computed exactly.

Coverage asks how much larger a policy's probability of a response can be than the reference's, or, with
features, which directions the data's features span (math.md section 4).

- ``density_ratios(logps, ref_logps)``: ``pi(y|x) / pi_ref(y|x)``.
- ``global_coverage(ref_logps)``: ``C_glo = sup_pi max_{x,y} pi/pi_ref = 1 / min pi_ref`` (Assumption 4.1);
  infinite as soon as pi_ref gives a response zero probability.
- ``kl_ball_coverage(ref_logps, radius)``: the largest ratio among policies with ``KL(pi || pi_ref) <= radius``
  (Assumption 4.2), exact by bisection; ``kl_ball_ratio(ref_mass, radius)`` for one response. Remark 4.1:
  it grows like ``exp(radius / p)``.
- ``feature_covariance`` and ``linear_coverage``: the largest ratio ``v' S_target v / v' S_data v`` over
  directions v, infinite when the target uses a direction the data never varies.
- ``partial_coverage_linear``: Liu et al.'s coefficient for linear rewards, ``||E_pi phi - E_base phi||``
  in the metric of the data's feature-difference covariance.

Tables are (X, Y) prompts x responses or (Y,) for one prompt; computations are float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rpo_lib._checks import as_tensor

__all__ = [
    "density_ratios",
    "feature_covariance",
    "global_coverage",
    "kl_ball_coverage",
    "kl_ball_ratio",
    "linear_coverage",
    "partial_coverage_linear",
    "point_mass_kl",
]


def _table(value, name: str) -> Tensor:
    table = as_tensor(value, name).double()
    return table.unsqueeze(0) if table.dim() == 1 else table


def density_ratios(logps, ref_logps) -> Tensor:
    """``pi(y|x) / pi_ref(y|x)`` elementwise, from log-probabilities (``inf`` where pi_ref is 0 and pi not)."""
    return (as_tensor(logps, "logps").double() - as_tensor(ref_logps, "ref_logps").double()).exp()


def global_coverage(ref_logps, prompt_probs=None) -> float:
    """``C_glo = 1 / min_{x: rho(x) > 0, y} pi_ref(y|x)``: the worst ratio any policy can reach (Assumption 4.1).

    A point mass on the rarest response attains it, so this is the supremum over *all* policies. It is
    ``inf`` when pi_ref gives some response zero probability: then no finite C_glo exists.
    """
    ref = _table(ref_logps, "ref_logps").exp()
    if prompt_probs is not None:
        ref = ref[as_tensor(prompt_probs, "prompt_probs") > 0]
    smallest = float(ref.min())
    return math.inf if smallest == 0.0 else 1.0 / smallest


def point_mass_kl(p, q) -> Tensor:
    """Smallest ``KL(pi || pi_ref)`` of a policy with ``pi(y) = p`` where ``pi_ref(y) = q``.

    The rest of the mass ``1 - p`` is spread like pi_ref over the other responses (that minimises KL):
    ``p log(p/q) + (1-p) log((1-p)/(1-q))``. Broadcasts; ``0 log 0 = 0``.
    """
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    first = torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p))
    rest = torch.where(p < 1, (1 - p) * ((1 - p) / (1 - q)).log(), torch.zeros_like(p))
    return first + rest


def kl_ball_ratio(ref_mass, radius: float) -> Tensor:
    """Largest ``pi(y) / pi_ref(y)`` over policies with ``KL(pi || pi_ref) <= radius``, for ``pi_ref(y) = ref_mass``.

    ``point_mass_kl(p, q)`` increases in p on [q, 1], so the largest feasible p solves
    ``point_mass_kl(p, q) = radius`` (bisection to machine precision) or is 1 when even a point mass fits
    (``log(1/q) <= radius``). Broadcasts over ``ref_mass``. Remark 4.1: for small q the answer behaves like
    ``exp(radius / p) ``: exponential in the radius.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0 (it bounds a KL divergence); got {radius}.")
    q = torch.as_tensor(ref_mass, dtype=torch.float64)
    if bool(((q <= 0) | (q > 1)).any()):
        raise ValueError("ref_mass must lie in (0, 1]: a response pi_ref never produces has an unbounded ratio.")
    low, high = q.clone(), torch.ones_like(q)
    for _ in range(200):  # bisection on [q, 1]; 200 halvings reach float64 resolution
        middle = (low + high) / 2
        feasible = point_mass_kl(middle, q) <= radius
        low = torch.where(feasible, middle, low)
        high = torch.where(feasible, high, middle)
    p = torch.where(q.log().neg() <= radius, torch.ones_like(q), low)
    return p / q


def kl_ball_coverage(ref_logps, radius: float, prompt_probs=None) -> float:
    """``C_kappa``: the largest density ratio among policies within reverse KL ``radius`` of pi_ref (Assumption 4.2).

    Computed per prompt (the ball bounds each prompt's KL), maximised over prompts with ``rho > 0`` and
    over responses: ``max kl_ball_ratio(pi_ref(y|x), radius)``. Always finite for a finite radius, unlike
    ``global_coverage``; but it can be exponentially large in the radius (Remark 4.1).
    """
    ref = _table(ref_logps, "ref_logps").exp()
    if prompt_probs is not None:
        ref = ref[as_tensor(prompt_probs, "prompt_probs") > 0]
    ref = ref[ref > 0]
    return float(kl_ball_ratio(ref, radius).max())


def feature_covariance(features, weights=None) -> Tensor:
    """``sum_i w_i phi_i phi_i^T / sum_i w_i`` (uncentred second moment) of (N, d) features; (d, d)."""
    phi = as_tensor(features, "features").double()
    if phi.dim() != 2:
        raise ValueError(f"features must be (N, d); got shape {tuple(phi.shape)}.")
    w = torch.ones(phi.shape[0], dtype=torch.float64) if weights is None else as_tensor(weights, "weights").double()
    if w.shape != (phi.shape[0],) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"weights must be {phi.shape[0]} non-negative numbers, not all zero.")
    return (phi * (w / w.sum())[:, None]).T @ phi


def linear_coverage(data_covariance, target_covariance, *, tol: float = 1e-9) -> float:
    """``sup_v (v' S_target v) / (v' S_data v)``: how much more a target policy uses any feature direction
    than the data shows it (math.md 4, linear coverage).

    Finite exactly when every direction the target uses lies in the span of the data's features; ``inf``
    otherwise (the data never varies that direction, so no reward fit can know its weight). Computed as the
    largest eigenvalue of ``S_data^{-1/2} S_target S_data^{-1/2}`` on the data's span.
    """
    data = as_tensor(data_covariance, "data_covariance").double()
    target = as_tensor(target_covariance, "target_covariance").double()
    if data.shape != target.shape or data.dim() != 2 or data.shape[0] != data.shape[1]:
        raise ValueError("data_covariance and target_covariance must be square (d, d) matrices of one size.")
    values, vectors = torch.linalg.eigh((data + data.T) / 2)
    scale = max(float(values.abs().max()), 1.0)
    inside = values > tol * scale
    null = vectors[:, ~inside]  # directions the data never varies
    if null.numel() and float((null.T @ target @ null).diagonal().max()) > tol * max(float(target.abs().max()), 1e-300):
        return math.inf
    basis = vectors[:, inside] / values[inside].sqrt()  # whitening on the data's span
    whitened = basis.T @ target @ basis
    return float(torch.linalg.eigvalsh((whitened + whitened.T) / 2).max())


def partial_coverage_linear(difference_covariance, policy_mean_feature, base_mean_feature, *,
                            tol: float = 1e-9) -> float:
    """Liu et al.'s partial coverage coefficient for linear rewards (math.md 4), in closed form.

    With ``r*(x, y) - r(x, y) = <v, phi(x, y)>`` the coefficient ``sup_v <v, E_pi phi - E_base phi> /
    sqrt(v' S v)``, where ``S = E_D[(phi(y+) - phi(y-))(phi(y+) - phi(y-))']``, is the norm of
    ``g = E_pi phi - E_base phi`` in the metric ``S^{-1}``: ``sqrt(g' S^+ g)``; ``inf`` when g has a component
    outside S's span (the target departs from the baseline in a direction no pair varies).
    """
    covariance = as_tensor(difference_covariance, "difference_covariance").double()
    gap = as_tensor(policy_mean_feature, "policy_mean_feature").double() - as_tensor(
        base_mean_feature, "base_mean_feature").double()
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    inside = values > tol * max(float(values.abs().max()), 1.0)
    coordinates = vectors.T @ gap
    outside = coordinates[~inside]
    if outside.numel() and float(outside.abs().max()) > tol * max(float(gap.abs().max()), 1e-300):
        return math.inf
    return float((coordinates[inside].pow(2) / values[inside]).sum().sqrt())
