"""Bandit worlds: finite prompts and responses in which every quantity of the theory is exact.

``BanditWorld`` holds a gold reward ``r*``, ``pi_ref``, the data distribution ``mu`` (zero marks what the
preference data never shows) and optional features ``phi``; its methods compute ``J``, reverse and forward
KL, the closed-form ``pi*``, the population DPO/IPO/BT losses and RPO's maximin objective exactly.
The constructors build the worlds of the notebooks: ``linear_world`` / ``tabular_world`` (Song et al.
section 6.1), ``hidden_flaw_world``, ``rare_data_world`` (Liu et al. section 5), ``three_response_world``
(Song et al. Prop. 4.1). Formulas: ``docs/math.md`` sections 2-8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

import torch
from torch import Tensor

from rpo_lib import bt, losses


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

    def suboptimality(self, logps: Tensor, beta: float) -> Tensor:
        """``J(pi*) - J(pi)`` under the gold reward, exactly; it equals ``beta * KL(pi || pi*)`` (docs/math.md 2)."""
        return self.objective(self.optimal_logps(beta), beta) - self.objective(logps, beta)

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


def three_response_world(q: float, *, gold_rewards: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> BanditWorld:
    """The construction of Song et al. Prop. 4.1 (docs/math.md 5): no prompt, ``Y = {y1, y2, y3}``.

    ``pi_ref = ((1 - q)/2, (1 - q)/2, q)``; the data cover y1 and y2 only, so y3 is produced by pi_ref
    (mass q) but never shown by the data. The gold rewards default to (1, 0, 0). The paper has ``q = 0``
    (its data distribution is pi_ref); docs/math.md section 5 says why the workbook keeps ``q > 0``.
    """
    if not 0 < q < 1:
        raise ValueError(f"q (the reference mass of y3) must be in (0, 1); got {q}.")
    ref = torch.tensor([[(1 - q) / 2, (1 - q) / 2, q]], dtype=torch.float64)
    return BanditWorld(
        gold_rewards=torch.tensor([gold_rewards], dtype=torch.float64), ref_logps=ref.log(),
        data_probs=torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64),
        prompt_probs=torch.ones(1, dtype=torch.float64), name=f"prop4.1 q={q:g}",
    )


def prop41_policy(world: BanditWorld, beta: float, y3_mass: float, *, method: Literal["dpo", "ipo"] = "dpo",
                  tau: float = 0.1) -> Tensor:
    """A member of the minimiser family of Prop. 4.1 (DPO) or Prop. 4.2 (IPO) in ``three_response_world``.

    The y1:y2 split is the one the population loss wants, which is all it sees, and the uncovered y3 gets mass
    ``y3_mass``. DPO's split is pi*'s (``beta``). IPO's (``method="ipo"``) regresses the pair's log-ratio gap
    ``h = log(pi(y1)/pi_ref(y1)) - log(pi(y2)/pi_ref(y2))`` onto ``1/(2 tau)`` with the label's sign, so its
    population minimiser is ``h = (2p - 1) / (2 tau)``, ``p = s(r*(y1) - r*(y2))``. Returns (1, 3) log-probs.
    """
    if world.n_responses != 3 or world.n_prompts != 1:
        raise ValueError("prop41_policy needs the three-response world: use three_response_world(q).")
    if not 0 <= y3_mass < 1:
        raise ValueError(f"y3_mass must be in [0, 1); got {y3_mass}.")
    if method == "dpo":
        split = world.optimal_logps(beta).exp()[0, :2]
    elif method == "ipo":
        p = torch.sigmoid(world.gold_rewards[0, 0] - world.gold_rewards[0, 1])
        split = torch.softmax(world.ref_logps[0, :2] + torch.stack([(2 * p - 1) / (2 * tau), p.new_zeros(())]), 0)
    else:
        raise ValueError(f"method must be 'dpo' or 'ipo'; got {method!r}.")
    covered = split / split.sum() * (1 - y3_mass)
    return torch.cat([covered, covered.new_tensor([y3_mass])]).log()[None]


def example61_world(theta_star: tuple[float, float] = (1.0, 10.0)) -> BanditWorld:
    """Song et al. Example 6.1: three responses with 2-d features, the data show two of them.

    ``phi(y1) = (1, 0)``, ``phi(y2) = (1/2, 1/2)``, ``phi(y3) = (0, 1)``; gold reward ``<theta*, phi>``; pi_ref
    uniform; the data compare y1 and y2 only. Their features span R^2 (global coverage in the linear sense), yet
    the only direction the pairs vary is ``phi(y2) - phi(y1) = (-1/2, 1/2)``. Our copy of the paper lost its
    ``theta*``; the default ``(1, 10)`` (rewards 1, 5.5, 10) makes the unseen y3 the best response.
    """
    features = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    gold = features @ torch.tensor(theta_star, dtype=torch.float64)
    return BanditWorld(
        gold_rewards=gold[None], ref_logps=_uniform_ref(1, 3),
        data_probs=torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64),
        prompt_probs=torch.ones(1, dtype=torch.float64), features=features[None], name="example 6.1",
    )


WORLDS: dict[str, Callable[[int], BanditWorld]] = {
    "linear": linear_world, "tabular": tabular_world, "hidden_flaw": hidden_flaw_world,
    "rare_data": rare_data_world}
