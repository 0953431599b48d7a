"""RPO's maximin objective (Liu et al. section 3; docs/math.md section 6) solved in both orders, on a bandit:
``solve_min_max`` uses the closed-form inner maximum, ``solve_max_min`` does not (notebook 05)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from rpo_lib.bandit.worlds import BanditWorld
from rpo_lib.env import one_thread


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
