"""Exact bandit worlds: every quantity of the theory computed exactly, and the methods trained on them.

A *bandit world* is a finite set of prompts ``x`` and responses ``y`` with a gold reward ``r*(x, y)``, a
reference policy ``pi_ref``, a data distribution ``mu`` over responses (``mu = 0`` marks the responses the
preference data never shows: coverage is a knob), and optionally feature vectors ``phi(x, y)``.

- Policies: ``TabularPolicy`` (one free logit per response) and ``LinearPolicy`` (softmax-linear,
  ``pi_theta(y|x) ∝ pi_ref(y|x) exp(<theta, phi(x, y)>)``: shared parameters). Both start at ``pi_ref``.
- Exact quantities (methods of ``BanditWorld``): expected gold reward, reverse and forward KL, the
  KL-regularised objective ``J``, its closed-form maximiser, the mass outside the data's support, and the
  population (infinite-data) DPO / IPO losses.
- Training: ``train(world, data, method, config)`` for ``"dpo"``, ``"ipo"``, ``"rpo"``, ``"hypo"`` (offline
  pairs, plus online samples from the current policy for HyPO) and ``"rlhf"`` (fit a BT reward model,
  then gradient ascent on the KL-regularised objective). The preference losses are the ones in
  ``rpo_lib.losses``, the same code that trains language models.
- Worlds: ``linear_world`` and ``tabular_world`` (Song et al. section 6.1), ``hidden_flaw_world`` (partial
  coverage in the linear sense: DPO moves mass onto responses the data never shows), ``three_response_world``
  (the construction of Song et al. Prop. 4.1).
- ``solve_min_max`` / ``solve_max_min``: RPO's maximin objective solved in both orders (notebook 05).
- ``experiment`` / ``extrapolation_experiment``: one call builds a world, samples its data, trains a method
  and returns the curves as numpy arrays.
- ``kl_gradient_estimates``: per-prompt REINFORCE / RLOO estimates of ``grad KL(pi || pi_ref)`` for a policy
  over token sequences, and the exact gradient, to measure the estimator's bias and variance.

Shapes: ``(X, Y)`` tables are prompts x responses; ``(X, Y, d)`` features. Everything is float64 so that
KL values of ``log(1/eps)`` size stay exact. Formulas: ``docs/math.md`` (this repository) sections 2-8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from rpo_lib import bt, losses
from rpo_lib.env import one_thread
from rpo_lib._checks import as_tensor

__all__ = [
    "METHODS",
    "BanditConfig",
    "BanditWorld",
    "LinearPolicy",
    "TabularPolicy",
    "WORLDS",
    "default_config",
    "experiment",
    "extrapolation_experiment",
    "finite_sample_experiment",
    "fit_reward_model",
    "fit_rpo",
    "hidden_flaw_world",
    "kl_gradient_estimates",
    "linear_world",
    "make_policy",
    "prop41_policy",
    "rare_data_world",
    "solve_max_min",
    "solve_min_max",
    "tabular_world",
    "three_response_world",
    "train",
]

Method = Literal["dpo", "ipo", "rlhf", "rpo", "hypo"]
METHODS: tuple[str, ...] = ("dpo", "ipo", "rlhf", "rpo", "hypo")


# ----------------------------------------------------------------------------------------------- worlds
@dataclass(frozen=True)
class BanditWorld:
    """A finite world in which every quantity of the theory is exact.

    Attributes:
        gold_rewards: (X, Y) the true reward ``r*``.
        ref_logps: (X, Y) ``log pi_ref(y|x)``, normalised per prompt.
        data_probs: (X, Y) the data distribution ``mu(y|x)`` from which pairs are drawn (unnormalised);
            zero marks a response the data never shows.
        prompt_probs: (X,) ``rho(x)``, normalised.
        features: (X, Y, d) ``phi(x, y)`` for softmax-linear policies, or None (tabular only).
        name: a short label for plots.
    """

    gold_rewards: Tensor
    ref_logps: Tensor
    data_probs: Tensor
    prompt_probs: Tensor
    features: Tensor | None = None
    name: str = "bandit"

    def __post_init__(self) -> None:
        shape = tuple(self.gold_rewards.shape)
        if len(shape) != 2:
            raise ValueError(f"gold_rewards must be (X, Y), prompts x responses; got shape {shape}.")
        for label, table in (("ref_logps", self.ref_logps), ("data_probs", self.data_probs)):
            if tuple(table.shape) != shape:
                raise ValueError(f"{label} has shape {tuple(table.shape)}; it must match gold_rewards {shape}.")
        if not torch.allclose(self.ref_logps.exp().sum(-1), torch.ones(shape[0], dtype=self.ref_logps.dtype)):
            raise ValueError("ref_logps must be normalised log-probabilities: use torch.log_softmax.")
        if self.features is not None and tuple(self.features.shape[:2]) != shape:
            raise ValueError(f"features must be (X, Y, d) with (X, Y) = {shape}; got {tuple(self.features.shape)}.")
        if tuple(self.prompt_probs.shape) != (shape[0],):
            raise ValueError(f"prompt_probs must have shape ({shape[0]},); got {tuple(self.prompt_probs.shape)}.")

    # -- sizes and masks
    @property
    def n_prompts(self) -> int:
        return int(self.gold_rewards.shape[0])

    @property
    def n_responses(self) -> int:
        return int(self.gold_rewards.shape[1])

    @property
    def covered(self) -> Tensor:
        """(X, Y) bool: responses the data can show (``mu > 0``)."""
        return self.data_probs > 0

    @property
    def best_response(self) -> Tensor:
        """(X,) index of the gold-optimal response of each prompt."""
        return self.gold_rewards.argmax(dim=-1)

    # -- exact quantities of a policy given by its (X, Y) log-probabilities
    def _average(self, per_prompt: Tensor) -> Tensor:
        return (self.prompt_probs * per_prompt).sum()

    def gold_reward(self, logps: Tensor) -> Tensor:
        """``E_x E_{y~pi} r*(x, y)`` exactly."""
        return self._average((logps.exp() * self.gold_rewards).sum(-1))

    def reverse_kl(self, logps: Tensor) -> Tensor:
        """``E_x KL(pi || pi_ref)``: the expectation is under pi itself (online samples, math.md 2)."""
        return self._average((logps.exp() * (logps - self.ref_logps)).sum(-1))

    def forward_kl(self, logps: Tensor) -> Tensor:
        """``E_x KL(pi_ref || pi)``: the expectation is under pi_ref (offline samples suffice)."""
        return self._average((self.ref_logps.exp() * (self.ref_logps - logps)).sum(-1))

    def objective(self, logps: Tensor, beta: float, rewards: Tensor | None = None) -> Tensor:
        """The KL-regularised objective ``J(pi) = E_x[E_pi r - beta KL(pi||pi_ref)]`` (docs/math.md 2).

        ``rewards`` defaults to the gold reward; pass a fitted reward model to get RLHF's objective.
        """
        rewards = self.gold_rewards if rewards is None else rewards.to(logps.dtype)
        return self._average((logps.exp() * rewards).sum(-1)) - beta * self.reverse_kl(logps)

    def optimal_logps(self, beta: float, rewards: Tensor | None = None) -> Tensor:
        """Closed-form maximiser of ``J``: ``pi* ∝ pi_ref exp(r / beta)`` (docs/math.md 2), as (X, Y) log-probs."""
        rewards = self.gold_rewards if rewards is None else rewards.to(self.ref_logps.dtype)
        return torch.log_softmax(self.ref_logps + rewards / beta, dim=-1)

    def ood_mass(self, logps: Tensor) -> Tensor:
        """``E_x pi(y not covered | x)``: probability of the responses outside the data's support."""
        return self._average((logps.exp() * (~self.covered)).sum(-1))

    def pair_distribution(self) -> tuple[Tensor, Tensor]:
        """The population of labelled pairs: ``(weights, label_probs)``, both (X, Y, Y).

        ``weights[x, a, b]`` is the probability that the data shows the unordered pair {a, b} at x in the
        order (a, b) (drawn as ``sample_comparisons`` draws: a, then b without replacement, from mu);
        ``label_probs[x, a, b] = s(r*(a) - r*(b))`` is the chance that a is preferred.
        """
        mu = self.data_probs / self.data_probs.sum(-1, keepdim=True)  # (X, Y)
        second = mu.unsqueeze(1) / (1 - mu).clamp_min(1e-300).unsqueeze(2)  # mu(b) / (1 - mu(a))
        weights = self.prompt_probs[:, None, None] * mu.unsqueeze(2) * second
        weights = weights * (1 - torch.eye(self.n_responses, dtype=weights.dtype))
        label_probs = torch.sigmoid(self.gold_rewards.unsqueeze(2) - self.gold_rewards.unsqueeze(1))
        return weights, label_probs

    @cached_property
    def _population_pairs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every (prompt, chosen, rejected) the data can show, with its probability: four (P,) tensors."""
        weights, label_probs = self.pair_distribution()
        x, a, b = torch.nonzero(weights > 0, as_tuple=True)
        w = weights[x, a, b]
        pair_weights = torch.cat([w * label_probs[x, a, b], w * (1 - label_probs[x, a, b])])
        return torch.cat([x, x]), torch.cat([a, b]), torch.cat([b, a]), pair_weights

    def population_bt_loss(self, rewards: Tensor) -> Tensor:
        """The BT loss ``L_D(r)`` of a reward table (X, Y) with infinitely many pairs from mu (``bt.bt_loss``)."""
        prompt, chosen, rejected, weights = self._population_pairs
        return bt.bt_loss(rewards[prompt, chosen], rewards[prompt, rejected], weights=weights)

    @cached_property
    def chosen_distribution(self) -> Tensor:
        """(X, Y): the probability that a data pair at x has chosen response y; RPO's ``pi_base``."""
        prompt, chosen, _, weights = self._population_pairs
        table = torch.zeros_like(self.gold_rewards).index_put_((prompt, chosen), weights, accumulate=True)
        return table / table.sum(-1, keepdim=True)

    def maximin_objective(self, logps: Tensor, rewards: Tensor, *, eta: float, beta: float,
                          base_probs: Tensor | None = None) -> Tensor:
        """RPO's maximin objective (Liu et al. 2024, section 3; docs/math.md section 6), exactly:

        ``phi(pi, r) = eta * (E_x[E_pi r - E_base r] - beta * KL(pi || pi_ref)) + L_D(r)``.

        The policy maximises it, the adversarial reward minimises it. eta weights the penalised objective,
        as in the paper: eta = 0 leaves only ``L_D`` (the adversary is the MLE reward, RPO is DPO), and the
        reparameterised loss is ``L_DPO + eta * beta * E_base[-log pi]`` (``rpo_loss(..., eta=eta)``).
        ``base_probs`` (X, Y) defaults to the chosen responses' distribution (``chosen_distribution``).
        """
        base = self.chosen_distribution if base_probs is None else base_probs
        gap = ((logps.exp() - base) * rewards).sum(-1)  # (X,)
        return eta * (self._average(gap) - beta * self.reverse_kl(logps)) + self.population_bt_loss(rewards)

    def population_loss(self, logps: Tensor, method: Literal["dpo", "ipo"] = "dpo", *, beta: float = 0.1,
                        tau: float = 0.1) -> Tensor:
        """The DPO (or IPO) loss with infinitely many pairs from ``mu``, exactly (``rpo_lib.losses``).

        Every ordered pair (a, b) with its label probability contributes twice: as (chosen=a, rejected=b)
        with weight ``w * P(a > b)`` and the other way round. Responses outside the data's support never
        enter: this is the loss whose minimiser set Prop. 4.1 is about.
        """
        prompt, chosen, rejected, pair_weights = self._population_pairs
        args = (logps[prompt, chosen], logps[prompt, rejected], self.ref_logps[prompt, chosen],
                self.ref_logps[prompt, rejected])
        if method == "dpo":
            return losses.dpo_loss(*args, beta=beta, weights=pair_weights).loss
        if method == "ipo":
            return losses.ipo_loss(*args, tau=tau, weights=pair_weights).loss
        raise ValueError(f"method must be 'dpo' or 'ipo'; got {method!r}.")

    def sample_data(self, n_pairs: int, seed: int | torch.Generator | None = None) -> bt.Comparisons:
        """``n_pairs`` BT-labelled pairs from ``mu`` (``rpo_lib.bt.sample_comparisons``)."""
        return bt.sample_comparisons(self.gold_rewards, n_pairs, response_probs=self.data_probs,
                                     prompt_probs=self.prompt_probs, seed=seed)


def _uniform_ref(n_prompts: int, n_responses: int) -> Tensor:
    return torch.full((n_prompts, n_responses), -math.log(n_responses), dtype=torch.float64)


def _unit_vectors(n: int, dim: int, generator: torch.Generator) -> Tensor:
    vectors = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return vectors / vectors.norm(dim=1, keepdim=True)


def linear_world(seed: int = 0, *, n_responses: int = 100, dim: int = 16, n_covered: int = 50,
                 first_weight: float = 3.0) -> BanditWorld:
    """Song et al. section 6.1.1: extrapolation with linear function approximation.

    ``n_responses - 1`` random unit-norm features in R^dim plus one special response built to be optimal;
    gold reward ``r* = <theta*, phi>``; pi_ref uniform; the data shows only the first ``n_covered``
    responses (which span R^dim, so the data covers every direction: global coverage in the linear sense),
    and never the best one. The extraction of the paper lost two values; chosen here:
    ``theta*[0] = first_weight = 3`` (the paper sets the first entry apart, the rest are Unif(-2, 2)), and
    the special response's feature is ``theta* / ||theta*||``, the unit vector of largest reward.
    """
    generator = torch.Generator().manual_seed(seed)
    theta_star = torch.rand(dim, generator=generator, dtype=torch.float64) * 4 - 2
    theta_star[0] = first_weight
    features = torch.cat([_unit_vectors(n_responses - 1, dim, generator), (theta_star / theta_star.norm())[None]])
    data_probs = torch.zeros(n_responses, dtype=torch.float64)
    data_probs[:n_covered] = 1.0
    return BanditWorld(
        gold_rewards=(features @ theta_star)[None], ref_logps=_uniform_ref(1, n_responses),
        data_probs=data_probs[None], prompt_probs=torch.ones(1, dtype=torch.float64), features=features[None],
        name="linear",
    )


def tabular_world(seed: int = 0, *, n_responses: int = 100, n_covered: int = 50,
                  reward_range: float = 10.0) -> BanditWorld:
    """Song et al. section 6.1.2: the same question without function approximation.

    ``r* ~ Unif(-reward_range, reward_range)`` independently per response, pi_ref uniform, the data shows
    the first ``n_covered`` responses only. No features: one free logit per response.
    """
    generator = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(n_responses, generator=generator, dtype=torch.float64) * 2 - 1) * reward_range
    data_probs = torch.zeros(n_responses, dtype=torch.float64)
    data_probs[:n_covered] = 1.0
    return BanditWorld(
        gold_rewards=rewards[None], ref_logps=_uniform_ref(1, n_responses), data_probs=data_probs[None],
        prompt_probs=torch.ones(1, dtype=torch.float64), name="tabular",
    )


def hidden_flaw_world(seed: int = 0, *, n_responses: int = 100, dim: int = 16, n_covered: int = 50,
                      flaw_penalty: float = 8.0, lure: float = 0.8, ref_ood_mass: float = 0.02) -> BanditWorld:
    """Partial coverage with shared parameters: responses the data never shows carry a hidden flaw.

    Features live in R^dim. The covered responses' features have a zero first coordinate, so the data
    never varies the first direction (the linear coverage of any policy that uses it is infinite). Every
    uncovered response has first coordinate 1 (the flaw, gold weight ``-flaw_penalty``) and, in the other
    coordinates, points ``lure`` of the way towards the direction of high reward: judged by everything the
    data can see, it looks like one of the best responses. This is reward hacking in miniature: a method
    that learns only what the data shows prefers the flawed responses. Gold reward ``r* = <theta*, phi>``
    with ``theta*[1:] ~ Unif(-2, 2)``. The reference policy rarely produces the flawed responses: they
    share ``ref_ood_mass`` (default 0.02) equally, the covered ones share the rest, which is why preference
    data sampled from it does not show them. Moving all the mass onto them costs a reverse KL of about
    ``log(1 / ref_ood_mass)``.
    """
    if not 0 < ref_ood_mass < 1:
        raise ValueError(f"ref_ood_mass must be in (0, 1); got {ref_ood_mass}.")
    generator = torch.Generator().manual_seed(seed)
    theta_star = torch.rand(dim, generator=generator, dtype=torch.float64) * 4 - 2
    theta_star[0] = -flaw_penalty
    visible = theta_star[1:] / theta_star[1:].norm()
    covered = _unit_vectors(n_covered, dim - 1, generator)
    noise = _unit_vectors(n_responses - n_covered, dim - 1, generator)
    uncovered = lure * visible + (1 - lure) * noise
    uncovered = uncovered / uncovered.norm(dim=1, keepdim=True)
    features = torch.zeros(n_responses, dim, dtype=torch.float64)
    features[:n_covered, 1:] = covered
    features[n_covered:, 1:] = uncovered
    features[n_covered:, 0] = 1.0
    data_probs = torch.zeros(n_responses, dtype=torch.float64)
    data_probs[:n_covered] = 1.0
    ref = torch.full((n_responses,), ref_ood_mass / (n_responses - n_covered), dtype=torch.float64)
    ref[:n_covered] = (1 - ref_ood_mass) / n_covered
    return BanditWorld(
        gold_rewards=(features @ theta_star)[None], ref_logps=ref.log()[None],
        data_probs=data_probs[None], prompt_probs=torch.ones(1, dtype=torch.float64), features=features[None],
        name="hidden_flaw",
    )


def rare_data_world(seed: int = 0, *, n_responses: int = 20, reward_range: float = 3.0,
                    decay: float = 0.8) -> BanditWorld:
    """Every response covered, some rarely: the setting of Liu et al.'s finite-sample guarantee (section 5).

    ``r* ~ Unif(-reward_range, reward_range)`` (bounded, so preferences stay random), pi_ref uniform, and the data
    show response i with probability proportional to ``decay**i`` in a random order: with few pairs, the rare
    responses' rewards are poorly estimated, which is where pessimism pays; with many, every reward is known.
    """
    generator = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(n_responses, generator=generator, dtype=torch.float64) * 2 - 1) * reward_range
    data_probs = (decay ** torch.arange(n_responses, dtype=torch.float64))[torch.randperm(n_responses,
                                                                                         generator=generator)]
    return BanditWorld(
        gold_rewards=rewards[None], ref_logps=_uniform_ref(1, n_responses), data_probs=data_probs[None],
        prompt_probs=torch.ones(1, dtype=torch.float64), name="rare_data",
    )


def three_response_world(eps: float, *, gold_rewards: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> BanditWorld:
    """The construction of Song et al. Prop. 4.1 (docs/math.md 5): no prompt, ``Y = {y1, y2, y3}``.

    ``pi_ref = ((1 - eps)/2, (1 - eps)/2, eps)``; the data covers y1 and y2 only, so y3 is seen by pi_ref
    (mass eps) but never by the data. The gold rewards default to (1, 0, 0).
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1); got {eps}.")
    ref = torch.tensor([[(1 - eps) / 2, (1 - eps) / 2, eps]], dtype=torch.float64)
    return BanditWorld(
        gold_rewards=torch.tensor([gold_rewards], dtype=torch.float64), ref_logps=ref.log(),
        data_probs=torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64),
        prompt_probs=torch.ones(1, dtype=torch.float64), name=f"prop4.1 eps={eps:g}",
    )


def prop41_policy(world: BanditWorld, beta: float, y3_mass: float) -> Tensor:
    """A member of the DPO minimiser family of Prop. 4.1 in ``three_response_world``: pi*'s y1:y2 ratio (which
    is all the DPO loss sees) and mass ``y3_mass`` on the uncovered y3. Returns (1, 3) log-probabilities."""
    if world.n_responses != 3 or world.n_prompts != 1:
        raise ValueError("prop41_policy needs the three-response world: use three_response_world(eps).")
    if not 0 <= y3_mass < 1:
        raise ValueError(f"y3_mass must be in [0, 1); got {y3_mass}.")
    best = world.optimal_logps(beta).exp()[0]
    covered = best[:2] / best[:2].sum() * (1 - y3_mass)
    return torch.cat([covered, covered.new_tensor([y3_mass])]).log()[None]


WORLDS: dict[str, Callable[[int], BanditWorld]] = {
    "linear": linear_world, "tabular": tabular_world, "hidden_flaw": hidden_flaw_world,
    "rare_data": rare_data_world}


# --------------------------------------------------------------------------------------------- policies
class TabularPolicy(nn.Module):
    """``pi(y|x) = softmax(log pi_ref(.|x) + delta(x, .))``: one free parameter per response, at pi_ref."""

    ref_logps: Tensor

    def __init__(self, world: BanditWorld) -> None:
        super().__init__()
        self.register_buffer("ref_logps", world.ref_logps.clone())
        self.delta = nn.Parameter(torch.zeros_like(world.ref_logps))

    def forward(self) -> Tensor:
        return torch.log_softmax(self.ref_logps + self.delta, dim=-1)  # (X, Y)


class LinearPolicy(nn.Module):
    """``pi_theta(y|x) ∝ pi_ref(y|x) exp(<theta, phi(x, y)>)``: softmax-linear, shared parameters.

    With a uniform pi_ref this is Song et al.'s ``pi_theta ∝ exp(<theta, phi>)``; ``theta = 0`` is pi_ref.
    The implicit DPO reward ``beta * log(pi_theta / pi_ref) = beta <theta, phi> - beta log Z`` is linear.
    """

    ref_logps: Tensor
    features: Tensor

    def __init__(self, world: BanditWorld) -> None:
        super().__init__()
        if world.features is None:
            raise ValueError(f"world {world.name!r} has no features: use TabularPolicy (function_approximation=False).")
        self.register_buffer("ref_logps", world.ref_logps.clone())
        self.register_buffer("features", world.features.clone())
        self.theta = nn.Parameter(torch.zeros(world.features.shape[-1], dtype=world.features.dtype))

    def forward(self) -> Tensor:
        return torch.log_softmax(self.ref_logps + self.features @ self.theta, dim=-1)  # (X, Y)


def make_policy(world: BanditWorld, function_approximation: bool | None = None) -> nn.Module:
    """A policy at pi_ref: linear when the world has features (unless told otherwise), else tabular."""
    if function_approximation is None:
        function_approximation = world.features is not None
    return LinearPolicy(world) if function_approximation else TabularPolicy(world)


# --------------------------------------------------------------------------------------------- training
@dataclass
class BanditConfig:
    """Hyper-parameters of ``train``; the defaults are the ones the notebooks use unless they say so.

    Attributes:
        steps: optimiser steps.
        lr: learning rate.
        optimizer: ``"sgd"`` (the paper's choice for DPO) or ``"adam"``.
        batch_size: pairs per step (DPO, IPO, RPO, HyPO); RLHF uses the exact full gradient.
        beta: KL strength of DPO / RPO / HyPO and of RLHF's objective.
        tau: IPO's regularisation (its target gap is ``1/(2 tau)``).
        eta: RPO's eta in Liu et al.'s convention: the loss is ``L_DPO + eta * beta * (-log pi(y+))``
            (``rpo_loss(..., eta=eta, normalization="sum")``, the reparameterised maximin); 0 is DPO. A
            response is one "token" here, so the SFT weight is ``eta * beta`` (0.1 by default).
        lam: weight of HyPO's online reverse-KL term.
        k: online samples per prompt for HyPO (RLOO needs k >= 2).
        online_batch: prompts per step for HyPO's online term.
        reward_l2: ridge of RLHF's reward fit (``rpo_lib.bt``).
        reward_bound: clip RLHF's fitted reward to ``[-R', R']`` (Assumption 4.4); None: no clip.
        n_logged: number of evaluation points along training.
        seed: seeds the minibatches and online samples.
    """

    steps: int = 2000
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: int = 64
    beta: float = 0.1
    tau: float = 0.1
    eta: float = 1.0
    lam: float = 0.05
    k: int = 2
    online_batch: int = 32
    reward_l2: float = 1e-4
    reward_bound: float | None = None
    n_logged: int = 101
    seed: int = 0


def _optimizer(parameters, config: BanditConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam'; got {config.optimizer!r}.")


@one_thread
def fit_reward_model(world: BanditWorld, data: bt.Comparisons, *, l2: float = 1e-4,
                     bound: float | None = None, function_approximation: bool | None = None) -> Tensor:
    """RLHF's first stage: a BT reward model of the same kind as the policy (linear or tabular), (X, Y).

    With features the reward is ``<w, phi>`` (``bt.fit_linear_rewards``); otherwise one reward per
    response (``bt.fit_tabular_rewards``; responses the data never shows stay at the prompt's mean).
    ``bound`` clips the result to ``[-bound, bound]``, the bounded reward class of Song et al. Lemma 4.1.
    """
    if function_approximation is None:
        function_approximation = world.features is not None
    if function_approximation:
        if world.features is None:
            raise ValueError(f"world {world.name!r} has no features; pass function_approximation=False.")
        phi = world.features
        w = bt.fit_linear_rewards(phi[data.prompt, data.chosen], phi[data.prompt, data.rejected], l2=l2)
        rewards = phi @ w
    else:
        rewards = bt.fit_tabular_rewards(data, world.n_responses, world.n_prompts, l2=l2).reshape(
            world.n_prompts, world.n_responses)
    return rewards if bound is None else rewards.clamp(-bound, bound)


def _logged_steps(steps: int, n_logged: int) -> list[int]:
    return sorted({int(round(s)) for s in np.linspace(0, steps, max(2, min(n_logged, steps + 1)))})


@one_thread
def train(world: BanditWorld, data: bt.Comparisons, method: Method, config: BanditConfig | None = None, *,
          policy: nn.Module | None = None, preferred_subset: Tensor | None = None,
          progress: bool = False) -> dict[str, np.ndarray]:
    """Train ``method`` on ``world`` from the preference ``data``; return its curves.

    Every step of DPO, IPO, RPO and HyPO draws a minibatch of pairs and calls the loss in ``rpo_lib.losses``
    with the policy's log-probabilities (a response is a one-"token" sequence). HyPO also draws ``k``
    responses per prompt from the current policy for the online reverse-KL term (RLOO). RLHF fits a BT
    reward model on the data (``fit_reward_model``), then runs gradient ascent on the exact
    KL-regularised objective with that reward.

    Args:
        policy: the model to train (``make_policy(world)`` by default); trained in place.
        preferred_subset: (P, 2) long tensor of (prompt, response) pairs whose mean log-prob is logged
            as ``logp_preferred``; by default the chosen responses of 10 random pairs of the data.
        progress: show a ``tqdm`` bar.
    Returns:
        numpy arrays over the logged steps: ``step``, ``logp_preferred``, ``logp_best`` (log-prob of the gold
        best response, mean over prompts), ``ood_mass``, ``reverse_kl``, ``gold_reward``, ``objective``
        (``J`` under the gold reward at the config's beta), ``logp_chosen`` / ``logp_rejected`` (mean over
        the whole data), ``loss`` (the training loss at that step; for RLHF minus the fitted objective).
    """
    config = config or BanditConfig()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if len(data) == 0:
        raise ValueError("data is empty: sample pairs with world.sample_data(n_pairs).")
    policy = make_policy(world) if policy is None else policy
    optimizer = _optimizer(policy.parameters(), config)
    generator = torch.Generator().manual_seed(config.seed)
    if preferred_subset is None:
        rows = torch.randperm(len(data), generator=generator)[:10]
        preferred_subset = torch.stack([data.prompt[rows], data.chosen[rows]], dim=1)
    ref = world.ref_logps
    reward_model = None
    if method == "rlhf":
        reward_model = fit_reward_model(world, data, l2=config.reward_l2, bound=config.reward_bound,
                                        function_approximation=isinstance(policy, LinearPolicy))

    def step_loss(logps: Tensor) -> Tensor:
        if method == "rlhf":
            assert reward_model is not None
            return -world.objective(logps, config.beta, rewards=reward_model)
        rows = torch.randint(len(data), (config.batch_size,), generator=generator)
        x, chosen, rejected = data.prompt[rows], data.chosen[rows], data.rejected[rows]
        args = (logps[x, chosen], logps[x, rejected], ref[x, chosen], ref[x, rejected])
        if method == "dpo":
            out = losses.dpo_loss(*args, beta=config.beta)
        elif method == "ipo":
            out = losses.ipo_loss(*args, tau=config.tau)
        elif method == "rpo":
            ones = torch.ones(config.batch_size, 1, dtype=torch.bool)
            out = losses.rpo_loss(*args, logps[x, chosen].unsqueeze(1), ones, beta=config.beta, eta=config.eta,
                                  normalization="sum")
        else:  # hypo: online samples from the current policy, k per prompt
            prompts = torch.multinomial(world.prompt_probs, config.online_batch, replacement=True,
                                        generator=generator)
            probs = logps.detach().exp()[prompts]  # (B', Y)
            samples = torch.multinomial(probs, config.k, replacement=True, generator=generator)  # (B', k)
            rows_x = prompts.unsqueeze(1).expand_as(samples)
            out = losses.hypo_loss(*args, logps[rows_x, samples], ref[rows_x, samples], beta=config.beta,
                                   lam=config.lam)
        return out.loss

    logged = set(_logged_steps(config.steps, config.n_logged))
    history: dict[str, list[float]] = {key: [] for key in (
        "step", "logp_preferred", "logp_best", "ood_mass", "reverse_kl", "gold_reward", "objective",
        "logp_chosen", "logp_rejected", "loss")}
    best = world.best_response
    prompt_index = torch.arange(world.n_prompts)

    def log(step: int, logps: Tensor, loss: float) -> None:
        logps = logps.detach()
        history["step"].append(step)
        history["logp_preferred"].append(float(logps[preferred_subset[:, 0], preferred_subset[:, 1]].mean()))
        history["logp_best"].append(float((world.prompt_probs * logps[prompt_index, best]).sum()))
        history["ood_mass"].append(float(world.ood_mass(logps)))
        history["reverse_kl"].append(float(world.reverse_kl(logps)))
        history["gold_reward"].append(float(world.gold_reward(logps)))
        history["objective"].append(float(world.objective(logps, config.beta)))
        history["logp_chosen"].append(float(logps[data.prompt, data.chosen].mean()))
        history["logp_rejected"].append(float(logps[data.prompt, data.rejected].mean()))
        history["loss"].append(loss)

    steps: Iterable[int] = range(config.steps + 1)
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        steps = tqdm(steps, desc=method, leave=False)
    for step in steps:
        logps = policy()
        loss = step_loss(logps)
        if step in logged:
            log(step, logps, float(loss.detach()))
        if step == config.steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {key: np.asarray(values) for key, values in history.items()}


# --------------------------------------------------------------------------- RPO's maximin, solved both ways
def _project(reward: Tensor, bound: float) -> None:
    with torch.no_grad():
        reward.clamp_(-bound, bound)


@one_thread
def solve_min_max(world: BanditWorld, *, eta: float, beta: float, reward_bound: float, steps: int = 4000,
                  lr: float = 0.02) -> tuple[float, Tensor, Tensor]:
    """``min_r max_pi maximin_objective`` over rewards in ``[-reward_bound, reward_bound]``.

    The inner maximum is the closed form ``pi_r ∝ pi_ref exp(r/beta)`` (docs/math.md 2); the outer minimisation is
    projected Adam on the (convex) result. Returns ``(value, reward, logps)``: the value, the adversary's
    reward (X, Y) and the policy ``pi_r`` (X, Y) at the solution.
    """
    reward = torch.zeros_like(world.gold_rewards, requires_grad=True)
    optimizer = torch.optim.Adam([reward], lr=lr)
    for _ in range(steps):
        value = world.maximin_objective(world.optimal_logps(beta, rewards=reward), reward, eta=eta, beta=beta)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        _project(reward, reward_bound)
    reward = reward.detach()
    logps = world.optimal_logps(beta, rewards=reward)
    return float(world.maximin_objective(logps, reward, eta=eta, beta=beta)), reward, logps


@one_thread
def solve_max_min(world: BanditWorld, *, eta: float, beta: float, reward_bound: float, steps: int = 1500,
                  inner_steps: int = 5, final_inner_steps: int = 3000, lr: float = 0.05,
                  progress: bool = False) -> tuple[float, Tensor, Tensor]:
    """``max_pi min_r maximin_objective`` by gradient ascent on the policy, without using the closed form.

    Each policy step first moves the adversary ``inner_steps`` projected-Adam steps towards its minimum
    (warm-started), then takes an ascent step with the adversary's reward held fixed: by Danskin's theorem
    that is the gradient of ``min_r``. At the end the inner minimum is solved to convergence for the final
    policy. Returns ``(value, reward, logps)`` like ``solve_min_max``.
    """
    theta = torch.zeros_like(world.ref_logps, requires_grad=True)
    reward = torch.zeros_like(world.gold_rewards, requires_grad=True)
    policy_optimizer = torch.optim.Adam([theta], lr=lr)
    reward_optimizer = torch.optim.Adam([reward], lr=lr)

    def adversary(logps: Tensor, n: int) -> None:
        for _ in range(n):
            value = world.maximin_objective(logps.detach(), reward, eta=eta, beta=beta)
            reward_optimizer.zero_grad()
            value.backward()
            reward_optimizer.step()
            _project(reward, reward_bound)

    outer: Iterable[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        outer = tqdm(outer, desc="max-min", leave=False)
    for _ in outer:
        logps = torch.log_softmax(world.ref_logps + theta, dim=-1)
        adversary(logps, inner_steps)
        value = -world.maximin_objective(logps, reward.detach(), eta=eta, beta=beta)
        policy_optimizer.zero_grad()
        value.backward()
        policy_optimizer.step()
    logps = torch.log_softmax(world.ref_logps + theta, dim=-1).detach()
    adversary(logps, final_inner_steps)
    reward = reward.detach()
    return float(world.maximin_objective(logps, reward, eta=eta, beta=beta)), reward, logps


# ------------------------------------------------------------------------------------------- experiments
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
def fit_rpo(world: BanditWorld, data: bt.Comparisons, *, eta: float, beta: float, steps: int = 400,
            lr: float = 0.1) -> Tensor:
    """RPO on the whole of ``data`` at once (full-batch Adam on a tabular policy): ``L_DPO + eta*beta*SFT``.

    ``eta`` is Liu et al.'s (0 is DPO). Returns the final (X, Y) log-probabilities. With eta = 0 and a
    response that won every comparison, DPO's loss has no minimiser; ``steps`` is then an early stop, the
    same for every eta.
    """
    policy = TabularPolicy(world)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    ref = world.ref_logps
    x, chosen, rejected = data.prompt, data.chosen, data.rejected
    every_row = torch.ones(len(data), 1, dtype=torch.bool)
    for _ in range(steps):
        logps = policy()
        loss = losses.rpo_loss(logps[x, chosen], logps[x, rejected], ref[x, chosen], ref[x, rejected],
                               logps[x, chosen].unsqueeze(1), every_row, beta=beta, eta=eta).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy().detach()


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
        best = world.objective(world.optimal_logps(beta), beta)
        for label, rule in eta_rules.items():
            logps = fit_rpo(world, data, eta=rule(n), beta=beta, steps=steps)
            gaps[label][i, j] = float(best - world.objective(logps, beta))
    return {"n_pairs": np.asarray(n_pairs), **gaps}


# ------------------------------------------------------------------------- the online KL estimator, measured
@one_thread
def kl_gradient_estimates(policy_logits: Tensor, ref_logps: Tensor, *, n_prompts: int, k: int = 2,
                          baseline: Literal["rloo", "none"] = "rloo",
                          seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """Per-prompt estimates of ``grad_theta KL(pi || pi_ref)`` from ``losses.online_kl_loss``, and the truth.

    The policy is over sequences of ``T`` tokens with independent positions, ``pi(y) = prod_t
    softmax(policy_logits[t])[y_t]`` (``T = 1``: a single categorical draw, i.e. a bandit). For each of
    ``n_prompts`` independent prompts, ``k`` sequences are drawn from pi and the RLOO (or plain REINFORCE)
    surrogate is differentiated, exactly as HyPO's online term is.

    Args:
        policy_logits: (T, V) logits of the policy. ref_logps: (T, V) log-probs of the reference.
    Returns:
        ``(estimates, exact_gradient, kl_estimate)``: (n_prompts, T*V) one gradient estimate per prompt,
        (T*V,) the exact gradient of the sequence-level KL, and the Monte-Carlo KL value.
    """
    policy_logits = as_tensor(policy_logits, "policy_logits").double()
    ref_logps = as_tensor(ref_logps, "ref_logps").double()
    if policy_logits.dim() != 2 or policy_logits.shape != ref_logps.shape:
        raise ValueError("policy_logits and ref_logps must both be (T, V): positions x vocabulary.")
    theta = policy_logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, dim=-1)
    exact_kl = (logp.exp() * (logp - ref_logps)).sum()  # sum over positions of the per-position KL
    (exact_gradient,) = torch.autograd.grad(exact_kl, theta)

    generator = torch.Generator().manual_seed(seed)
    length, vocab = policy_logits.shape
    probs = torch.softmax(policy_logits, dim=-1)  # (T, V)
    tokens = torch.multinomial(probs.repeat(n_prompts * k, 1), 1, replacement=True, generator=generator)
    tokens = tokens.view(n_prompts, k, length)  # (B, k, T)
    theta = policy_logits.expand(n_prompts, length, vocab).clone().requires_grad_(True)  # one copy per prompt
    token_logps = torch.log_softmax(theta, dim=-1).unsqueeze(1).expand(-1, k, -1, -1)  # (B, k, T, V)
    sample_logps = token_logps.gather(3, tokens.unsqueeze(-1)).squeeze(-1).sum(dim=2)  # (B, k)
    ref_sample_logps = ref_logps[torch.arange(length), tokens].sum(dim=2)  # (B, k)
    loss, kl = losses.online_kl_loss(sample_logps, ref_sample_logps, baseline=baseline)
    loss.backward()
    assert theta.grad is not None
    # the loss averages over prompts: scale back to one estimate per prompt
    return theta.grad.flatten(1) * n_prompts, exact_gradient.flatten(), float(kl)
