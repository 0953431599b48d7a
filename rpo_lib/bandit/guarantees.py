"""Song et al.'s guarantees as experiments (docs/math.md sections 10-11): every bound computed, every gap exact.

All bounds here come from one decomposition (Song et al. Lemma A.1; docs/math.md section 10). A policy ``pi_hat``
that maximises ``J`` under a reward ``r_hat`` (RLHF's fitted reward, or DPO's implicit reward
``beta * log(pi_hat / pi_ref)``) satisfies, for any per-prompt shift ``c``,

    J(pi*) - J(pi_hat) <= E_{pi*}|Delta| + E_{pi_hat}|Delta|  <=  2 * sqrt(C * eps),   Delta = r_hat - r* - c,

where ``eps = E_{y~mu}[Delta^2]`` is the in-distribution squared error (Assumption 4.3) and ``C`` bounds
``pi/mu`` for both policies: ``C_glo`` (Theorem 4.1) or, when both lie in the KL ball of radius
``kappa = 2R'/beta``, ``C_kappa`` (Theorems 4.2 and D.1). Song et al. take ``mu = pi_ref``; so do these functions.

- ``reward_error``: ``eps`` (with the best shift) and the largest error anywhere (Remark 4.2).
- ``guarantee_rows``: Theorems 4.1, 4.2 and D.1 side by side on ``three_response_world(q)``, for the worst policy
  each method may return.
- ``global_coverage_experiment``: Theorem 4.1 with DPO trained on N pairs of a fully covered world.
- ``kl_bounds``: what a forward KL and a reverse KL each bound (docs/math.md section 11).
- ``epochs_experiment``: KL over epochs of finite data, DPO against HyPO (Song et al. Fig. 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
from torch import Tensor

from rpo_lib import coverage
from rpo_lib.bandit.training import BanditConfig, fit_rpo, train
from rpo_lib.bandit.worlds import WORLDS, BanditWorld, prop41_policy, tabular_world, three_response_world
from rpo_lib.env import one_thread

__all__ = [
    "GuaranteeRow",
    "epochs_experiment",
    "global_coverage_experiment",
    "guarantee_rows",
    "hypo_worst_policy",
    "implicit_reward",
    "kl_bounds",
    "reward_error",
]


def implicit_reward(world: BanditWorld, logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``beta * log(pi / pi_ref)`` (X, Y): the reward for which ``pi`` is optimal."""
    return beta * (logps - world.ref_logps)


def reward_error(world: BanditWorld, rewards: Tensor, measure: Tensor | None = None) -> tuple[float, float]:
    """In-distribution error of a learned reward, and its largest error anywhere.

    Returns ``(eps, sup_error)``. ``eps = E_x min_c E_{y~measure}[(r - r* - c)^2]`` is Assumption 4.3's quantity
    with the best per-prompt shift (BT identifies rewards only up to ``c(x)``); ``measure`` (X, Y) defaults to
    ``pi_ref``, Song et al.'s data distribution. ``sup_error = max_{x,y} |r - r* - c(x)|`` with the same shift:
    what the folklore "DPO = RLHF" silently assumes small (Remark 4.2).
    """
    weights = world.ref_logps.exp() if measure is None else measure / measure.sum(-1, keepdim=True)
    delta = rewards.to(world.gold_rewards.dtype) - world.gold_rewards
    shift = (weights * delta).sum(-1, keepdim=True)
    centred = delta - shift
    eps = world._average((weights * centred**2).sum(-1))
    return float(eps), float(centred.abs().max())


@dataclass(frozen=True)
class GuaranteeRow:
    """One method's worst case in ``three_response_world(q)`` and its guarantee.

    Attributes:
        method: ``"DPO"`` (Theorem 4.1), ``"RLHF"`` (Theorem 4.2) or ``"HyPO"`` (Theorem D.1).
        q: reference mass of the unseen response y3.
        gap: ``J(pi*) - J(pi_hat)``, exact.
        eps: in-distribution squared reward error under ``pi_ref`` (``reward_error``).
        coverage: the coefficient the theorem uses: ``C_glo`` for DPO, ``C_kappa`` for RLHF and HyPO.
        bound: ``2 * sqrt(coverage * eps)``.
        reverse_kl: ``KL(pi_hat || pi_ref)``.
        y3_mass: ``pi_hat(y3)``.
    """

    method: str
    q: float
    gap: float
    eps: float
    coverage: float
    bound: float
    reverse_kl: float
    y3_mass: float


def hypo_worst_policy(world: BanditWorld, beta: float, kappa: float) -> Tensor:
    """The worst solution of HyPO's constrained problem in ``three_response_world``: among DPO's minimisers
    (``prop41_policy``), the one with the most mass on y3 whose ``KL(pi || pi_ref)`` is at most ``kappa``."""
    low, high = float(world.ref_logps.exp()[0, 2]), 1.0 - 1e-12
    if float(world.reverse_kl(prop41_policy(world, beta, low))) > kappa:
        raise ValueError(f"kappa = {kappa} is below the KL of every DPO minimiser: raise it to at least "
                         "KL(pi* || pi_ref).")
    for _ in range(200):  # the family's KL increases in the y3 mass above pi_ref(y3): bisect
        middle = (low + high) / 2
        if float(world.reverse_kl(prop41_policy(world, beta, middle))) <= kappa:
            low = middle
        else:
            high = middle
    return prop41_policy(world, beta, low)


def guarantee_rows(q: float, *, beta: float = 0.5, reward_bound: float = 1.0,
                   dpo_y3_mass: float = 0.5) -> list[GuaranteeRow]:
    """Theorems 4.1, 4.2 and D.1 on ``three_response_world(q)`` (gold rewards (1, 0, 0), so R = 1).

    The data show y1 and y2 only (as N pairs from pi_ref do when ``N * q << 1``); each method's worst output:
    - DPO: a minimiser of its loss with ``dpo_y3_mass`` on y3 (Prop. 4.1); Theorem 4.1's ``C_glo = 1/min pi_ref``.
    - RLHF: the reward learned exactly on y1, y2 and set to the adversarial ``+reward_bound = R'`` on y3, the
      policy ``pi ∝ pi_ref exp(r_hat / beta)``; Theorem 4.2's ``C_kappa`` with ``kappa = 2R'/beta`` (Lemma 4.1).
    - HyPO: the DPO minimiser with the most y3 mass inside the same KL ball (``hypo_worst_policy``); Theorem D.1.
    """
    if reward_bound < 1.0:
        raise ValueError("reward_bound R' must be at least the gold reward's bound R = 1 (Assumption 4.4).")
    world = three_response_world(q)
    kappa = 2 * reward_bound / beta
    c_glo = coverage.global_coverage(world.ref_logps)
    c_kappa = coverage.kl_ball_coverage(world.ref_logps, kappa)
    rlhf_reward = world.gold_rewards.clone()
    rlhf_reward[0, 2] = reward_bound
    candidates = {
        "DPO": (prop41_policy(world, beta, dpo_y3_mass), None, c_glo),
        "RLHF": (world.optimal_logps(beta, rewards=rlhf_reward), rlhf_reward, c_kappa),
        "HyPO": (hypo_worst_policy(world, beta, kappa), None, c_kappa),
    }
    rows = []
    for method, (logps, reward, coefficient) in candidates.items():
        reward = implicit_reward(world, logps, beta) if reward is None else reward
        eps, _ = reward_error(world, reward)
        rows.append(GuaranteeRow(
            method=method, q=q, gap=float(world.suboptimality(logps, beta)), eps=eps, coverage=coefficient,
            bound=2 * math.sqrt(coefficient * eps), reverse_kl=float(world.reverse_kl(logps)),
            y3_mass=float(logps.exp()[0, 2])))
    return rows


@one_thread
def global_coverage_experiment(n_pairs: Iterable[int], *, seeds: Iterable[int] = (0, 1, 2), beta: float = 0.5,
                               n_responses: int = 20, reward_range: float = 3.0,
                               steps: int = 400) -> dict[str, np.ndarray]:
    """Theorem 4.1, trained: DPO (``fit_rpo`` with eta = 0) on N pairs of a world whose data cover every response.

    The world is ``tabular_world(seed, n_responses=20, n_covered=20, reward_range=3)``: pi_ref = mu uniform, so
    ``C_glo = n_responses``. Returns ``{"n_pairs": (K,), "gap", "eps", "bound": (S, K)}`` with ``bound =
    2 sqrt(C_glo * eps)``; the theorem says ``gap <= bound`` for every run.
    """
    n_pairs, seeds = list(n_pairs), list(seeds)
    out = {key: np.zeros((len(seeds), len(n_pairs))) for key in ("gap", "eps", "bound")}
    for i, seed in enumerate(seeds):
        world = tabular_world(seed, n_responses=n_responses, n_covered=n_responses, reward_range=reward_range)
        c_glo = coverage.global_coverage(world.ref_logps)
        for j, n in enumerate(n_pairs):
            data = world.sample_data(n, seed=1000 * seed + n)
            logps = fit_rpo(world, data, eta=0.0, beta=beta, steps=steps)
            eps, _ = reward_error(world, implicit_reward(world, logps, beta))
            out["gap"][i, j] = float(world.suboptimality(logps, beta))
            out["eps"][i, j] = eps
            out["bound"][i, j] = 2 * math.sqrt(c_glo * eps)
    return {"n_pairs": np.asarray(n_pairs), **out}


def kl_bounds(world: BanditWorld, logps: Tensor) -> dict[str, float]:
    """What each KL bounds for the policy ``logps`` (docs/math.md section 11); one prompt.

    Forward: ``S`` is the support of RPO's ``pi_base`` (the chosen responses); ``pi(S) >= exp(-KL(pi_base || pi))``.
    Reverse: ``U`` is the set the data never show; ``kl(pi(U) || pi_ref(U)) <= KL(pi || pi_ref)``, so ``pi(U)`` is at
    most ``u_max``, the largest mass that the policy's own reverse KL allows on U.
    Returns ``forward_kl``, ``mass_on_data`` (pi(S)), ``mass_on_data_bound``, ``reverse_kl``, ``mass_unseen``
    (pi(U)), ``ref_mass_unseen`` (pi_ref(U)), ``binary_kl_unseen`` and ``u_max``.
    """
    if world.n_prompts != 1:
        raise ValueError("kl_bounds takes a one-prompt world (the bounds hold per prompt).")
    probs, base, ref = logps.exp()[0], world.chosen_distribution[0], world.ref_logps.exp()[0]
    support = base > 0
    forward = float((base[support] * (base[support].log() - logps[0][support])).sum())
    unseen = ~world.covered[0]
    mass_unseen, ref_unseen = float(probs[unseen].sum()), float(ref[unseen].sum())
    reverse = float(world.reverse_kl(logps))
    return {
        "forward_kl": forward, "mass_on_data": float(probs[support].sum()), "mass_on_data_bound": math.exp(-forward),
        "reverse_kl": reverse, "mass_unseen": mass_unseen, "ref_mass_unseen": ref_unseen,
        "binary_kl_unseen": float(coverage.point_mass_kl(mass_unseen, ref_unseen)),
        "u_max": float(coverage.kl_ball_ratio(ref_unseen, reverse)) * ref_unseen,
    }


@one_thread
def epochs_experiment(*, world: str = "hidden_flaw", n_pairs: int = 256, epochs: int = 20,
                      methods: Iterable[str] = ("dpo", "hypo"), seeds: Iterable[int] = (0, 1, 2),
                      config: BanditConfig | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Song et al. Fig. 1 on a bandit: several epochs over a fixed, small data set; the reverse KL after each.

    Each seed builds ``WORLDS[world](seed)`` and draws ``n_pairs`` pairs once; every method then trains for
    ``epochs`` passes (``epochs * n_pairs / batch_size`` steps of ``train``, logged once per epoch). The default
    config is ``BanditConfig(lr=2.0, batch_size=16)``: SGD, beta 0.1, HyPO's lambda 0.05 with k = 2.
    Returns ``{"epoch": (E+1,), method: (S, E+1) reverse KL, method + "_gold": (S, E+1) gold reward}``.
    """
    config = config or BanditConfig(lr=2.0, batch_size=16)
    steps_per_epoch = max(1, n_pairs // config.batch_size)
    seeds, methods = list(seeds), list(methods)
    out: dict[str, np.ndarray] = {"epoch": np.arange(epochs + 1)}
    for method in methods:
        out[method] = np.zeros((len(seeds), epochs + 1))
        out[method + "_gold"] = np.zeros((len(seeds), epochs + 1))
    runs = [(i, seed, method) for i, seed in enumerate(seeds) for method in methods]
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        runs = tqdm(runs, desc="seeds x methods", leave=False)
    for i, seed, method in runs:
        bandit = WORLDS[world](seed)
        data = bandit.sample_data(n_pairs, seed=seed)
        run_config = replace(config, steps=epochs * steps_per_epoch, n_logged=epochs + 1, seed=seed)
        curves = train(bandit, data, method, run_config)  # type: ignore[arg-type]  # logged at every epoch's end
        out[method][i] = curves["reverse_kl"]
        out[method + "_gold"][i] = curves["gold_reward"]
    return out
