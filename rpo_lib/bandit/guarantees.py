"""The papers' guarantees as experiments (docs/math.md sections 10-11): every bound computed, every gap exact.

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

Liu et al.'s Theorem 5.3 (section 5; docs/math.md section 10) has a different shape: against any comparator ``pi``
it bounds the *unregularised* reward gap ``Gap(pi_hat) = E_pi r* - E_pi_hat r*`` by
``[sqrt(6) (1 + e^R)^2 (C^2 + 1) iota + 4 KL(pi || pi_ref)] / (4 sqrt(N))`` for ``beta = 1/sqrt(N)`` and its own eta.

- ``partial_coverage``: the coefficient ``C(R; pi, pi_base)`` of Assumption 5.2, exactly, for tabular rewards.
- ``liu_bound``, ``liu_eta``: the right-hand side of Theorem 5.3 and the eta it prescribes, constants included.
- ``liu_guarantee_experiment``: Theorem 5.3's prescription trained on ``rare_data_world``, the gap beside its bound.
- ``loglog_slope``: the fitted rate of a gap against N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from rpo_lib import coverage
from rpo_lib.bandit.training import BanditConfig, fit_rpo, train
from rpo_lib.bandit.worlds import (WORLDS, BanditWorld, prop41_policy, rare_data_world, tabular_world,
                                   three_response_world)
from rpo_lib.env import one_thread

__all__ = [
    "GuaranteeRow",
    "epochs_experiment",
    "global_coverage_experiment",
    "guarantee_rows",
    "hypo_worst_policy",
    "implicit_reward",
    "kl_bounds",
    "liu_bound",
    "liu_eta",
    "liu_guarantee_experiment",
    "loglog_slope",
    "partial_coverage",
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


def partial_coverage(world: BanditWorld, target_probs: Tensor, base_probs: Tensor | None = None) -> float:
    """Liu et al.'s partial coverage coefficient ``C(R; pi, pi_base)`` (Assumption 5.2) for tabular rewards, exactly.

    ``C = sup_D E_x[E_pi D - E_base D] / sqrt(E_data[(D(y1) - D(y0))^2])`` over reward errors ``D = r* - r``.
    With a table of rewards every direction of ``D`` is allowed (the ratio does not change when ``D`` is scaled, and
    a small multiple of any direction keeps ``r`` inside the bounded class when ``r*`` is inside), so this is
    ``coverage.partial_coverage_linear`` with one-hot features of ``(x, y)``: the norm of the policy difference in
    the metric of the data's pair Laplacian. ``base_probs`` defaults to the chosen responses (``pi_base`` of Liu et
    al.'s experiments). Infinite when ``pi`` departs from ``pi_base`` where no pair of the data reaches.
    """
    weights, _ = world.pair_distribution()  # (X, Y, Y): probability of showing (a, b) at x
    base = world.chosen_distribution if base_probs is None else base_probs
    blocks = [torch.diag(w.sum(0) + w.sum(1)) - w - w.T for w in weights]  # sum_ab w_ab (e_a - e_b)(e_a - e_b)'
    laplacian = torch.block_diag(*blocks)
    difference = (world.prompt_probs[:, None] * (target_probs.to(base.dtype) - base)).reshape(-1)
    return coverage.partial_coverage_linear(laplacian, difference, torch.zeros_like(difference))


def _log_covering(reward_bound: float, n_pairs: int, n_cells: int) -> float:
    """``log N_cov`` of the tables in ``[0, R]^n_cells`` under the sup norm at Theorem 5.3's radius
    ``rho = 1 / (6 (1 + e^R) N)`` (the paper's epsilon): a grid of spacing ``2 rho`` needs ``ceil(R / (2 rho))``
    points per cell."""
    radius = 1.0 / (6.0 * (1.0 + math.exp(reward_bound)) * n_pairs)
    return n_cells * math.log(math.ceil(reward_bound / (2 * radius)))


def liu_eta(n_pairs: int, *, reward_bound: float, n_cells: int, delta: float = 0.1) -> float:
    """The eta Theorem 5.3 prescribes: ``(1 + e^R)^-2 sqrt(24 log(N_cov / delta) / N)`` (with ``beta = 1/sqrt(N)``)."""
    log_cover = _log_covering(reward_bound, n_pairs, n_cells) + math.log(1 / delta)
    return math.sqrt(24 * log_cover / n_pairs) / (1 + math.exp(reward_bound)) ** 2


def liu_bound(coefficient: float, n_pairs: int, kl: float, *, reward_bound: float, n_cells: int,
              delta: float = 0.1) -> float:
    """The right-hand side of Liu et al.'s Theorem 5.3 (eq. 5.3), every constant kept, for tabular rewards.

    ``[sqrt(6) (1 + e^R)^2 (C^2 + 1) iota + 4 KL(pi || pi_ref)] / (4 sqrt(N))`` with ``iota = sqrt(log(N_cov /
    delta))``; it holds with probability at least ``1 - delta``. ``reward_bound`` is R of Assumption 5.1 (rewards in
    ``[0, R]``: a reward range, since shifts are invisible), ``n_cells`` the number of (prompt, response) cells.
    """
    iota = math.sqrt(_log_covering(reward_bound, n_pairs, n_cells) + math.log(1 / delta))
    return (math.sqrt(6) * (1 + math.exp(reward_bound)) ** 2 * (coefficient**2 + 1) * iota + 4 * kl) / (
        4 * math.sqrt(n_pairs))


def loglog_slope(n_pairs: Iterable[float], gaps: Iterable[float]) -> float:
    """The least-squares slope of ``log gap`` against ``log N``: ``-0.5`` is the ``1/sqrt(N)`` rate."""
    x, y = np.log(np.asarray(list(n_pairs), dtype=float)), np.log(np.asarray(list(gaps), dtype=float))
    return float(np.polyfit(x, y, 1)[0])


@one_thread
def liu_guarantee_experiment(n_pairs: Iterable[int], *, seeds: Iterable[int] = (0, 1, 2), steps: int = 400,
                             delta: float = 0.1, progress: bool = False) -> dict[str, np.ndarray]:
    """Liu et al.'s Theorem 5.3 on ``rare_data_world``, in the theorem's own terms.

    For each seed and N: RPO with the theorem's ``beta = 1/sqrt(N)`` and ``eta = liu_eta(N)`` (``fit_rpo``, its
    learning rate scaled by ``1/beta`` so that Adam moves the implicit reward ``beta * log(pi/pi_ref)`` at the same
    pace for every beta), and the unregularised gap ``E_pi r* - E_pi_hat r*`` to the comparator ``pi`` = the best
    response, beside the bound (``liu_bound``, R = the world's reward range, ``pi_base`` = the chosen responses).
    Returns ``{"n_pairs": (K,), "gap", "bound", "eta": (S, K), "coverage", "kl", "reward_range": (S,)}``.
    """
    n_pairs, seeds = list(n_pairs), list(seeds)
    out: dict[str, np.ndarray] = {key: np.zeros((len(seeds), len(n_pairs))) for key in ("gap", "bound", "eta")}
    out["coverage"], out["kl"], out["reward_range"] = (np.zeros(len(seeds)) for _ in range(3))
    cells = [(i, seed, j, n) for i, seed in enumerate(seeds) for j, n in enumerate(n_pairs)]
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        cells = tqdm(cells, desc="worlds x N", leave=False)
    for i, seed, j, n in cells:
        world = rare_data_world(seed)
        rewards = world.gold_rewards[0]
        target = torch.zeros_like(world.gold_rewards)
        target[0, int(rewards.argmax())] = 1.0
        reward_range = float(rewards.max() - rewards.min())
        out["reward_range"][i] = reward_range
        out["coverage"][i] = partial_coverage(world, target)
        out["kl"][i] = float((-world.ref_logps[0, int(rewards.argmax())]))  # KL(point mass || pi_ref)
        beta = 1 / math.sqrt(n)
        eta = liu_eta(n, reward_bound=reward_range, n_cells=world.n_responses, delta=delta)
        data = world.sample_data(n, seed=1000 * seed + n)
        logps = fit_rpo(world, data, eta=eta, beta=beta, steps=steps, lr=0.05 / beta)
        out["gap"][i, j] = float(rewards.max() - (logps.exp()[0] * rewards).sum())
        out["bound"][i, j] = liu_bound(out["coverage"][i], n, out["kl"][i], reward_bound=reward_range,
                                       n_cells=world.n_responses, delta=delta)
        out["eta"][i, j] = eta
    return {"n_pairs": np.asarray(n_pairs), **out}
