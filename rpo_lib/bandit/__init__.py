"""Exact bandit worlds: every quantity of the theory computed exactly, and the methods trained on them.

A *bandit world* is a finite set of prompts ``x`` and responses ``y`` with a gold reward ``r*(x, y)``, a
reference policy ``pi_ref``, a data distribution ``mu`` over responses (``mu = 0`` marks the responses the
preference data never shows: coverage is a knob), and optionally feature vectors ``phi(x, y)``.
Everything is importable from ``rpo_lib.bandit``; each concept lives in its own module:

=====================================  ===================================================================
module                                 what it holds (notebook)
=====================================  ===================================================================
``rpo_lib.bandit.worlds``              ``BanditWorld`` and its exact quantities (``J``, reverse/forward KL,
                                       ``pi*``, population DPO/BT losses, RPO's maximin objective); the
                                       worlds ``linear_world``, ``tabular_world``, ``hidden_flaw_world``,
                                       ``rare_data_world``, ``three_response_world`` (03-06)
``rpo_lib.bandit.policies``            ``TabularPolicy``, ``LinearPolicy`` (softmax-linear), ``make_policy``
``rpo_lib.bandit.training``            ``BanditConfig``, ``train`` (DPO, IPO, RPO, HyPO, RLHF with the losses
                                       of ``rpo_lib.losses``), ``fit_reward_model``, ``fit_rpo``
``rpo_lib.bandit.maximin``             RPO's maximin solved both ways: ``solve_min_max``, ``solve_max_min`` (05)
``rpo_lib.bandit.guarantees``          the guarantees as experiments: Song et al.'s Theorems 4.1, 4.2 and D.1,
                                       Remark 4.2, forward vs reverse KL, KL over epochs (Fig. 1) (04, 06);
                                       Liu et al.'s partial coverage and Theorem 5.3 with its constants (05)
``rpo_lib.bandit.experiments``         one-call experiments: ``experiment``, ``extrapolation_experiment``,
                                       ``finite_sample_experiment`` (Liu et al. section 5),
                                       ``base_policy_experiment`` (Liu et al.'s choice of pi_base)
``rpo_lib.bandit.estimators``          ``kl_gradient_estimates``: HyPO's REINFORCE / RLOO estimator measured (06)
=====================================  ===================================================================

Shapes: ``(X, Y)`` tables are prompts x responses; ``(X, Y, d)`` features. Everything is float64 so that
KL values of ``log(1/q)`` size stay exact. Formulas: ``docs/math.md`` (this repository) sections 2-8.
"""

from rpo_lib.bandit import guarantees
from rpo_lib.bandit.estimators import kl_gradient_estimates
from rpo_lib.bandit.experiments import (base_policy_experiment, default_config, experiment, extrapolation_experiment,
                                        finite_sample_experiment)
from rpo_lib.bandit.maximin import solve_max_min, solve_min_max
from rpo_lib.bandit.policies import LinearPolicy, TabularPolicy, make_policy
from rpo_lib.bandit.training import METHODS, BanditConfig, Method, fit_reward_model, fit_rpo, train
from rpo_lib.bandit.worlds import (
    WORLDS,
    BanditWorld,
    example61_world,
    hidden_flaw_world,
    linear_world,
    prop41_policy,
    rare_data_world,
    tabular_world,
    three_response_world,
)

__all__ = [
    "METHODS",
    "Method",
    "BanditConfig",
    "BanditWorld",
    "LinearPolicy",
    "TabularPolicy",
    "WORLDS",
    "default_config",
    "example61_world",
    "base_policy_experiment",
    "experiment",
    "extrapolation_experiment",
    "finite_sample_experiment",
    "fit_reward_model",
    "fit_rpo",
    "guarantees",
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
