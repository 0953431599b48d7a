"""Bandit policies: ``TabularPolicy`` (one free logit per response) and ``LinearPolicy`` (softmax-linear,
shared parameters). Both start at ``pi_ref``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rpo_lib.bandit.worlds import BanditWorld


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
