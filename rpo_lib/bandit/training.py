"""Training on a bandit world with the library's losses: ``train`` (DPO, IPO, RPO, HyPO, RLHF by minibatches),
``fit_reward_model`` (RLHF's BT stage) and ``fit_rpo`` (full-batch RPO, Liu et al. section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from rpo_lib import bt, losses
from rpo_lib.bandit.policies import LinearPolicy, TabularPolicy, make_policy
from rpo_lib.bandit.worlds import BanditWorld
from rpo_lib.env import one_thread

Method = Literal["dpo", "ipo", "rlhf", "rpo", "hypo"]
METHODS: tuple[str, ...] = ("dpo", "ipo", "rlhf", "rpo", "hypo")


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
        base: RPO's baseline policy ``pi_base``, the responses its SFT term imitates (Liu et al. Remark 5.4):
            ``"chosen"``, the chosen response of each pair (the paper's experiments), or ``"reference"``, a
            response drawn from ``pi_ref`` at the pair's prompt (the initial model's responses, which Liu et al.
            name as the other practical choice).
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
    base: Literal["chosen", "reference"] = "chosen"
    lam: float = 0.05
    k: int = 2
    online_batch: int = 32
    reward_l2: float = 1e-4
    reward_bound: float | None = None
    n_logged: int = 101
    seed: int = 0

    def __post_init__(self) -> None:
        if self.base not in ("chosen", "reference"):
            raise ValueError(f"BanditConfig.base must be 'chosen' or 'reference'; got {self.base!r}.")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"BanditConfig.optimizer must be 'sgd' or 'adam'; got {self.optimizer!r}.")


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
            imitated = chosen if config.base == "chosen" else torch.multinomial(
                ref[x].exp(), 1, generator=generator).squeeze(1)  # pi_base = pi_ref: the initial model's response
            out = losses.rpo_loss(*args, logps[x, imitated].unsqueeze(1), ones, beta=config.beta, eta=config.eta,
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
