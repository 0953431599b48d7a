"""The Bradley-Terry (BT) preference model: probabilities, sampled labels, maximum-likelihood rewards.

Everything here is math.md section 1. Rewards are tensors whose last dimension indexes responses; an
optional leading dimension indexes prompts: ``rewards[x, y]``.

- ``preference_probability(r_a, r_b)``: ``P(a > b) = s(r_a - r_b)``.
- ``bt_loss(r_chosen, r_rejected)``: the negative log-likelihood of observed preferences, the loss that
  reward models minimise and that DPO minimises with ``r = beta * log(pi / pi_ref)`` (see ``losses``).
- ``sample_comparisons``: draw prompts and response pairs from a data distribution and label them by BT.
- ``fit_tabular_rewards`` / ``fit_linear_rewards``: maximum-likelihood reward fitting.
- ``center_rewards``, ``best_shift``, ``shift_aligned_error``: BT sees only reward differences, so a
  reward is identified only up to a per-prompt shift ``c(x)``; these compare rewards modulo that shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rpo_lib._checks import as_tensor, check_finite, check_not_empty, to_float32

__all__ = [
    "Comparisons",
    "best_shift",
    "bt_loss",
    "center_rewards",
    "fit_linear_rewards",
    "fit_tabular_rewards",
    "make_generator",
    "min_preference_noise",
    "preference_probability",
    "sample_comparisons",
    "sample_labels",
    "shift_aligned_error",
    "weighted_mean",
]


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from an int seed (or the generator itself); ``None`` draws a seed from torch's RNG."""
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed))
    return generator


def preference_probability(reward_a, reward_b) -> Tensor:
    """BT probability that response ``a`` is preferred to ``b``: ``s(r_a - r_b)`` (math.md section 1).

    Broadcasts like ``reward_a - reward_b``; computed in float32 (float64 is kept).
    """
    reward_a = to_float32(as_tensor(reward_a, "reward_a"))
    reward_b = to_float32(as_tensor(reward_b, "reward_b"))
    return torch.sigmoid(reward_a - reward_b)


def bt_loss(chosen_rewards, rejected_rewards, *, weights=None) -> Tensor:
    """BT negative log-likelihood ``-mean log s(r(y+) - r(y-))`` over a batch of preferences (math.md 1).

    Args:
        chosen_rewards: (N,) rewards of the preferred responses.
        rejected_rewards: (N,) rewards of the dispreferred responses.
        weights: optional (N,) non-negative pair weights (e.g. each pair's probability under the data
            distribution, for an exact population loss); the loss is then ``sum(w * l) / sum(w)``.
    Returns:
        A scalar tensor; differentiable in both arguments. ``log s`` is computed with ``logsigmoid``, which
        stays finite for large reward gaps where ``log(sigmoid(.))`` would underflow to ``-inf``.
    """
    chosen = to_float32(as_tensor(chosen_rewards, "chosen_rewards"))
    rejected = to_float32(as_tensor(rejected_rewards, "rejected_rewards"))
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen_rewards has shape {tuple(chosen.shape)} but rejected_rewards has shape "
            f"{tuple(rejected.shape)}: pass one reward of each per preference pair."
        )
    check_not_empty(chosen, "chosen_rewards")
    return weighted_mean(-F.logsigmoid(chosen - rejected), weights)


def weighted_mean(values: Tensor, weights=None) -> Tensor:
    """``values.mean()``, or ``sum(w * v) / sum(w)`` with checked non-negative ``weights`` of the same shape."""
    if weights is None:
        return values.mean()
    weights = as_tensor(weights, "weights").to(values.dtype)
    if weights.shape != values.shape:
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected {tuple(values.shape)}, one per pair.")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("weights must be non-negative and not all zero.")
    return (weights * values).sum() / weights.sum()


def min_preference_noise(reward_bound: float) -> float:
    """Smallest probability that the worse response wins when ``|r*| <= R``: ``s(-2R)`` (math.md 1).

    Bounded rewards therefore mean preferences are never deterministic: even the best response against the
    worst loses with probability at least ``s(-2R)``.
    """
    if reward_bound < 0:
        raise ValueError(f"reward_bound must be >= 0 (it bounds |r*|); got {reward_bound}.")
    return 1.0 / (1.0 + math.exp(2.0 * reward_bound))


def sample_labels(reward_a, reward_b, *, seed: int | torch.Generator | None = None) -> Tensor:
    """Draw BT labels: a boolean tensor, True where ``a`` is preferred, with probability ``s(r_a - r_b)``."""
    probability = preference_probability(reward_a, reward_b).cpu()  # labels are drawn on the CPU
    generator = make_generator(seed)
    return torch.rand(probability.shape, generator=generator, dtype=torch.float64) < probability.double()


@dataclass(frozen=True)
class Comparisons:
    """Labelled preference data in index form: pair ``i`` says ``chosen[i]`` beat ``rejected[i]`` at
    prompt ``prompt[i]``. All three are int64 tensors of shape (N,)."""

    prompt: Tensor
    chosen: Tensor
    rejected: Tensor

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def rewards_of(self, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """Rewards of the chosen and rejected responses under a reward table (n_prompts, n_responses)."""
        table = _as_table(rewards)
        return table[self.prompt, self.chosen], table[self.prompt, self.rejected]

    def pairwise_wins(self, n_responses: int, n_prompts: int = 1) -> Tensor:
        """``wins[x, a, b]``: how often ``a`` beat ``b`` at prompt ``x``; shape (n_prompts, R, R).

        ``wins + wins.transpose(-1, -2)`` counts the comparisons of each pair: a zero there is a pair the
        data never compared.
        """
        wins = torch.zeros(n_prompts, n_responses, n_responses)
        wins.index_put_((self.prompt, self.chosen, self.rejected), torch.ones(len(self)), accumulate=True)
        return wins


def _as_table(rewards) -> Tensor:
    """Rewards as a (n_prompts, n_responses) table; a 1-D reward vector is one prompt."""
    table = as_tensor(rewards, "rewards")
    if table.dim() == 1:
        table = table.unsqueeze(0)
    if table.dim() != 2:
        raise ValueError(
            f"rewards has shape {tuple(table.shape)}; expected (n_responses,) or (n_prompts, n_responses)."
        )
    return table


def sample_comparisons(
    rewards,
    n_pairs: int,
    *,
    response_probs=None,
    prompt_probs=None,
    seed: int | torch.Generator | None = None,
) -> Comparisons:
    """Draw ``n_pairs`` preference pairs and label them by BT under the true ``rewards``.

    Each pair: a prompt ``x ~ prompt_probs`` (uniform by default), two *distinct* responses drawn without
    replacement from ``response_probs[x]`` (uniform by default), and a BT label. ``response_probs`` is the
    data distribution ``mu``: giving some responses zero probability is how later notebooks switch off
    coverage.

    Args:
        rewards: (n_responses,) or (n_prompts, n_responses) true rewards ``r*``.
        n_pairs: number of labelled pairs N.
        response_probs: (n_responses,) shared by all prompts, or (n_prompts, n_responses); need not sum to 1.
        prompt_probs: (n_prompts,); need not sum to 1.
        seed: int or ``torch.Generator``; the same seed gives the same data.
    """
    table = to_float32(_as_table(rewards)).cpu()  # data generation happens on the CPU
    check_finite(table, "rewards")
    n_prompts, n_responses = table.shape
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1; got {n_pairs}.")
    generator = make_generator(seed)

    if response_probs is None:
        response_probs = torch.ones(n_prompts, n_responses)
    response_probs = to_float32(as_tensor(response_probs, "response_probs")).cpu()
    if response_probs.dim() == 1:
        response_probs = response_probs.expand(n_prompts, -1)
    if response_probs.shape != (n_prompts, n_responses):
        raise ValueError(
            f"response_probs has shape {tuple(response_probs.shape)}; expected ({n_responses},) or "
            f"({n_prompts}, {n_responses}) to match rewards."
        )
    if bool((response_probs < 0).any()) or bool(((response_probs > 0).sum(dim=1) < 2).any()):
        raise ValueError(
            "response_probs must be non-negative with at least two responses of positive probability per "
            "prompt: a pair needs two distinct responses."
        )
    if prompt_probs is None:
        prompt_probs = torch.ones(n_prompts)
    prompt_probs = to_float32(as_tensor(prompt_probs, "prompt_probs")).cpu()
    if prompt_probs.shape != (n_prompts,) or bool((prompt_probs < 0).any()) or float(prompt_probs.sum()) <= 0:
        raise ValueError(f"prompt_probs must be {n_prompts} non-negative weights, not all zero.")

    prompt = torch.multinomial(prompt_probs, n_pairs, replacement=True, generator=generator)
    pairs = torch.multinomial(response_probs[prompt], 2, replacement=False, generator=generator)  # (N, 2)
    first, second = pairs[:, 0], pairs[:, 1]
    first_wins = sample_labels(table[prompt, first], table[prompt, second], seed=generator)
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return Comparisons(prompt=prompt, chosen=chosen, rejected=rejected)


def _fit_bt(
    parameters: Tensor,
    reward_gaps: Callable[[Tensor], Tensor],
    *,
    l2: float,
    max_iter: int,
) -> Tensor:
    """Minimise ``bt_loss + l2/2 * ||parameters||^2`` with L-BFGS (the problem is convex) in float64.

    ``reward_gaps(parameters)`` returns ``r(y+) - r(y-)`` for every pair. The ridge term makes the
    maximum-likelihood estimate exist when the data are separable (a response that always wins would
    otherwise push its reward to infinity); keep it small to stay close to the MLE.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0; got {l2}.")
    parameters = parameters.detach().clone().double().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [parameters], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
        history_size=50, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        gaps = reward_gaps(parameters)
        objective = -F.logsigmoid(gaps).mean() + 0.5 * l2 * parameters.pow(2).sum()
        objective.backward()
        return objective

    optimizer.step(closure)
    return parameters.detach()


def fit_linear_rewards(chosen_features, rejected_features, *, l2: float = 1e-4, max_iter: int = 500) -> Tensor:
    """Maximum-likelihood linear reward ``r(x, y) = <w, phi(x, y)>`` from preference pairs (math.md 1, 4).

    BT with a linear reward is logistic regression on feature differences ``phi(y+) - phi(y-)``.

    Args:
        chosen_features: (N, d) features of the preferred responses.
        rejected_features: (N, d) features of the dispreferred responses.
        l2: ridge strength (see ``_fit_bt``); 0 gives the plain MLE when it exists.
    Returns:
        w: (d,) float64. Directions that no feature difference spans are not identified by the data; the
        ridge sets them to zero.
    """
    chosen = as_tensor(chosen_features, "chosen_features").double()
    rejected = as_tensor(rejected_features, "rejected_features").double()
    if chosen.dim() != 2 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen_features {tuple(chosen.shape)} and rejected_features {tuple(rejected.shape)} must both "
            f"have shape (N, d)."
        )
    differences = chosen - rejected  # (N, d)
    return _fit_bt(torch.zeros(chosen.shape[1]), lambda w: differences @ w, l2=l2, max_iter=max_iter)


def fit_tabular_rewards(
    comparisons: Comparisons,
    n_responses: int,
    n_prompts: int = 1,
    *,
    l2: float = 1e-4,
    max_iter: int = 500,
) -> Tensor:
    """Maximum-likelihood tabular reward: one free reward per (prompt, response) (math.md section 1).

    Returns a float64 table of shape (n_prompts, n_responses), or (n_responses,) when ``n_prompts == 1``,
    centred to mean zero per prompt (``center_rewards``), since BT fixes rewards only up to a per-prompt
    shift. Responses that no pair mentions stay at the prompt's mean (the ridge pins them).
    """
    if len(comparisons) == 0:
        raise ValueError("comparisons is empty: fitting a reward needs at least one labelled pair.")
    if int(comparisons.prompt.max()) >= n_prompts or int(
        torch.maximum(comparisons.chosen, comparisons.rejected).max()
    ) >= n_responses:
        raise ValueError(
            f"comparisons mention a prompt or response index outside n_prompts={n_prompts}, "
            f"n_responses={n_responses}: pass the sizes of the world the data came from."
        )
    chosen_index = comparisons.prompt * n_responses + comparisons.chosen
    rejected_index = comparisons.prompt * n_responses + comparisons.rejected
    flat = _fit_bt(
        torch.zeros(n_prompts * n_responses),
        lambda r: r[chosen_index] - r[rejected_index],
        l2=l2,
        max_iter=max_iter,
    )
    table = center_rewards(flat.view(n_prompts, n_responses))
    return table[0] if n_prompts == 1 else table


def center_rewards(rewards) -> Tensor:
    """Subtract each prompt's mean reward (over the last dimension): a canonical member of the class
    ``{r + c(x)}`` that BT cannot tell apart."""
    rewards = as_tensor(rewards, "rewards")
    return rewards - rewards.mean(dim=-1, keepdim=True)


def best_shift(estimate, truth) -> Tensor:
    """The per-prompt shift ``c(x)`` that brings ``estimate + c`` closest to ``truth`` in squared error.

    Returns shape ``estimate.shape[:-1]`` (a scalar tensor for one prompt).
    """
    estimate, truth = as_tensor(estimate, "estimate"), as_tensor(truth, "truth")
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and truth {tuple(truth.shape)} must match.")
    return (truth - estimate).mean(dim=-1)


def shift_aligned_error(estimate, truth) -> float:
    """Root-mean-square error between ``estimate`` and ``truth`` after the best per-prompt shift: the
    error that preference data can actually see."""
    estimate, truth = as_tensor(estimate, "estimate").double(), as_tensor(truth, "truth").double()
    aligned = estimate + best_shift(estimate, truth).unsqueeze(-1)
    return float((aligned - truth).pow(2).mean().sqrt())
