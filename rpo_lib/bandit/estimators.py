"""The online KL estimator of HyPO, measured: per-prompt REINFORCE / RLOO gradient estimates and the truth."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rpo_lib import losses
from rpo_lib._checks import as_tensor
from rpo_lib.env import one_thread


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
