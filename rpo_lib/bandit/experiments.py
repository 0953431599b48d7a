"""One-call experiments on bandit worlds: build a world from a seed, draw its data, train, return curves."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import numpy as np

from rpo_lib.bandit.training import METHODS, BanditConfig, Method, fit_rpo, train
from rpo_lib.bandit.worlds import WORLDS, rare_data_world
from rpo_lib.env import one_thread


def default_config(world: str, method: Method) -> BanditConfig:
    """The hyper-parameters of ``experiment`` for a world and method (stated, not tuned per seed).

    All worlds: SGD, batch 64, beta 0.1 (DPO, RPO, HyPO and RLHF's objective), tau 0.1 for IPO,
    RPO eta 1 (Liu et al.'s convention: SFT weight eta * beta = 0.1 on
    the one-token NLL), HyPO lambda 0.05 with k = 2 online samples per prompt.
    Steps: 5000 in the tabular world (the paper's "5000 iterations"), 1500 with features (the paper does not
    say; the curves have settled by then).
    RLHF: ridge 1e-4 on the reward fit, exact gradient ascent. Learning rates: 0.05 with features, 1.0 for
    the tabular world (whose logits need to travel further), RLHF 0.5.
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {tuple(WORLDS)}; got {world!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    tabular = world == "tabular"
    lr = {"dpo": 1.0 if tabular else 2.0, "rpo": 1.0 if tabular else 2.0, "hypo": 1.0 if tabular else 2.0,
          "ipo": 0.1 if tabular else 0.2, "rlhf": 0.5}[method]
    return BanditConfig(steps=5000 if tabular else 1500, lr=lr)


def experiment(world: str, method: Method, seed: int = 0, steps: int | None = None, *, n_pairs: int = 10_000,
               config: BanditConfig | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Build world ``world`` with ``seed``, draw ``n_pairs`` BT pairs from it, train ``method``.

    ``world`` is one of ``WORLDS`` (``"linear"``, ``"tabular"``, ``"hidden_flaw"``). The world, the data
    and the minibatches all derive from ``seed``, so the same call returns the same arrays. ``steps``
    overrides the config's number of steps. Returns ``train``'s curves.
    """
    config = config or default_config(world, method)
    config = replace(config, seed=seed, steps=config.steps if steps is None else steps)
    bandit = WORLDS[world](seed)
    data = bandit.sample_data(n_pairs, seed=seed)
    return train(bandit, data, method, config, progress=progress)


def extrapolation_experiment(method: Method, function_approximation: bool, seed: int = 0,
                             steps: int | None = None) -> dict[str, np.ndarray]:
    """Song et al. section 6.1: train ``method`` with (``linear_world``) or without (``tabular_world``)
    function approximation.

    Returns numpy arrays keyed ``step``, ``logp_preferred`` (mean log-prob of a fixed random subset of
    preferred responses), ``logp_best``, ``ood_mass`` (mass outside the data's support), ``reverse_kl``,
    ``gold_reward`` (and the extra curves of ``train``). Hyper-parameters: ``default_config``. One call
    runs in a few seconds on a laptop CPU.
    """
    return experiment("linear" if function_approximation else "tabular", method, seed, steps)


@one_thread
def finite_sample_experiment(n_pairs: Iterable[int], eta_rules: dict[str, Callable[[int], float]], *,
                             seeds: Iterable[int] = (0, 1, 2), beta: float = 0.5, steps: int = 400,
                             progress: bool = False) -> dict[str, np.ndarray]:
    """Liu et al. section 5 on ``rare_data_world``: the suboptimality ``J(pi*) - J(pi_hat)`` of RPO against N.

    ``eta_rules`` maps a label to ``eta(N)``, e.g. ``{"DPO": lambda n: 0.0, "fixed": lambda n: 0.3,
    "3/sqrt(N)": lambda n: 3 / n ** 0.5}``. For each seed (one world and one data draw per seed and N) and each N,
    every rule is fitted with ``fit_rpo``. Returns ``{"n_pairs": (K,), label: (S, K) gaps}``.
    """
    n_pairs, seeds = list(n_pairs), list(seeds)
    gaps = {label: np.zeros((len(seeds), len(n_pairs))) for label in eta_rules}
    cells = [(i, seed, j, n) for i, seed in enumerate(seeds) for j, n in enumerate(n_pairs)]
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        cells = tqdm(cells, desc="worlds x N", leave=False)
    for i, seed, j, n in cells:
        world = rare_data_world(seed)
        data = world.sample_data(n, seed=1000 * seed + n)
        for label, rule in eta_rules.items():
            logps = fit_rpo(world, data, eta=rule(n), beta=beta, steps=steps)
            gaps[label][i, j] = float(world.suboptimality(logps, beta))
    return {"n_pairs": np.asarray(n_pairs), **gaps}


@one_thread
def base_policy_experiment(worlds: Iterable[str] = ("hidden_flaw", "linear", "tabular"), *,
                           seeds: Iterable[int] = (0, 1, 2), progress: bool = False) -> dict[tuple[str, str], dict]:
    """Liu et al.'s choice of ``pi_base`` (Remark 5.4), varied: RPO imitating the chosen responses or ``pi_ref``'s.

    For each world and seed, RPO runs with ``default_config(world, "rpo")`` and ``base`` = ``"chosen"`` or
    ``"reference"``, DPO beside them (same data, same minibatches). Returns ``{(world, label): {"gold_reward",
    "ood_mass", "reverse_kl", "logp_chosen_change": (S,) final values}}`` for label in ``"dpo"``,
    ``"rpo, chosen"``, ``"rpo, reference"``.
    """
    seeds = list(seeds)
    runs = [(name, label) for name in worlds for label in ("dpo", "rpo, chosen", "rpo, reference")]
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        runs = tqdm(runs, desc="worlds x methods", leave=False)
    out: dict[tuple[str, str], dict] = {}
    for name, label in runs:
        method: Method = "dpo" if label == "dpo" else "rpo"
        config = default_config(name, method)
        if method == "rpo":
            config = replace(config, base="chosen" if label.endswith("chosen") else "reference")
        curves = [experiment(name, method, seed, config=config) for seed in seeds]
        out[name, label] = {
            "gold_reward": np.array([c["gold_reward"][-1] for c in curves]),
            "ood_mass": np.array([c["ood_mass"][-1] for c in curves]),
            "reverse_kl": np.array([c["reverse_kl"][-1] for c in curves]),
            "logp_chosen_change": np.array([c["logp_chosen"][-1] - c["logp_chosen"][0] for c in curves]),
        }
    return out
