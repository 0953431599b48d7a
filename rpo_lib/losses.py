"""Preference-optimisation losses as pure tensor functions: DPO, IPO, SFT, RPO, online reverse KL, HyPO.

No model, tokenizer or config enters here: the callers (the bandit trainers, the language-model trainer,
a user's own loop) compute log-probabilities and pass tensors. The same code therefore trains a 3-armed
bandit and a 7B model.

Conventions
-----------
- Sequence log-probabilities have shape (B,): ``log pi(y|x)``, one value per pair. How they were reduced
  over tokens (sum, the usual DPO choice, or mean) is the caller's explicit choice, made in
  ``rpo_lib.logprobs.sequence_logprobs``.
- Inputs may be float32 or bfloat16 (or float64); the arithmetic is done in float32 (float64 is kept).
- Bad input raises ``ValueError`` naming the argument: mismatched shapes, non-finite values, an empty batch,
  an all-zero completion mask, fewer than two online samples per prompt, a hyperparameter that is NaN,
  infinite or out of range. A loss never returns a silent NaN.
- The preference losses return a ``PreferenceLoss``: ``.loss`` to backpropagate, detached implicit rewards
  ``beta * (log pi - log pi_ref)`` for chosen and rejected, and ``.metrics`` (floats) under the names TRL
  logs: ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
  ``logps/chosen``, ``logps/rejected``, plus ``loss/dpo``, ``loss/sft``, ``kl/online`` where present.
  ``.metric_tensors`` holds the same values as detached 0-d tensors on the inputs' device: a training loop
  reads them once per step instead of stalling a GPU for every number (``rpo_lib.train`` does).
- The value checks can be deferred (``rpo_lib._checks.deferred_checks``) so that a training step reads them
  back once; they are never skipped.

Equations: ``docs/math.md`` (in this repository) sections 3 (DPO, IPO), 6 (RPO) and 7 (HyPO).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rpo_lib._checks import (check_finite, check_hyperparameter, check_not_empty, check_sequence_logps,
                             check_token_inputs, to_float32)
from rpo_lib.bt import bt_loss, weighted_mean

__all__ = [
    "Coefficient",
    "LossTerm",
    "Normalization",
    "PreferenceLoss",
    "RPOVariant",
    "RPO_VARIANTS",
    "dpo_loss",
    "hypo_loss",
    "hypo_online_term",
    "ipo_loss",
    "online_kl_loss",
    "rpo_loss",
    "rloo_advantages",
    "rpo_variant_losses",
    "sft_loss",
]

Normalization = Literal["sum", "seq_mean", "token_mean"]
_NORMALIZATIONS = ("sum", "seq_mean", "token_mean")


def _as_floats(values: dict[str, Tensor]) -> dict[str, float]:
    """Detached 0-d tensors -> floats, read back in one transfer."""
    if not values:
        return {}
    numbers = torch.stack([value.detach().to(torch.float32).reshape(()) for value in values.values()]).tolist()
    return dict(zip(values, numbers, strict=True))


@dataclass
class PreferenceLoss:
    """What every preference loss returns.

    Attributes:
        loss: scalar tensor to backpropagate.
        chosen_rewards: (B,) detached implicit rewards ``beta * (log pi(y+) - log pi_ref(y+))``.
        rejected_rewards: (B,) the same for the rejected responses.
        metric_tensors: detached 0-d tensors for logging (see the module docstring for the names).
        metrics: the same as floats (read back from the device when asked for).
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metric_tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return _as_floats(self.metric_tensors)


@dataclass
class LossTerm:
    """One additive term of a loss (HyPO's online KL): ``.loss`` to backpropagate and its metrics."""

    loss: Tensor
    metric_tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return _as_floats(self.metric_tensors)


def _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """Checked float32 log-ratios ``log pi/pi_ref`` of chosen and rejected, each (B,)."""
    check_sequence_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    chosen = to_float32(policy_chosen_logps) - to_float32(ref_chosen_logps)
    rejected = to_float32(policy_rejected_logps) - to_float32(ref_rejected_logps)
    return chosen, rejected


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen_logps: Tensor,
                    policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        # Strictly greater, as TRL counts it: a tie (e.g. at initialisation) is not a correct ranking.
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    weights: Tensor | None = None,
) -> PreferenceLoss:
    """DPO: the BT loss on implicit rewards ``beta * log(pi/pi_ref)`` (Rafailov et al. 2023, eq. 7).

    ``L = -mean log s(beta * [log pi(y+)/pi_ref(y+) - log pi(y-)/pi_ref(y-)])``   (math.md section 3)

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) ``log pi_theta(y|x)`` of chosen / rejected.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference policy.
        beta: KL strength (> 0); small beta lets the policy move further from the reference.
        weights: optional (B,) non-negative pair weights; the loss becomes ``sum(w l) / sum(w)`` (the
            metrics stay plain batch means). The bandit worlds use it for exact population losses.
    Returns:
        ``PreferenceLoss``. Equal log-ratios give ``loss = log 2``.
    """
    beta = check_hyperparameter(beta, "beta", positive=True)
    chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
    # The Z(x) of the reparameterisation cancels inside the difference, so DPO *is* the BT loss (bt.py).
    loss = bt_loss(chosen_rewards, rejected_rewards, weights=weights)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = _reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    metrics["loss/dpo"] = loss.detach()
    return PreferenceLoss(loss, chosen_rewards, rejected_rewards, metrics)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    tau: float,
    weights: Tensor | None = None,
) -> PreferenceLoss:
    """IPO (Azar et al. 2024): squared regression of the log-ratio gap onto ``1/(2 tau)`` (math.md 3).

    ``h = log pi(y+)/pi_ref(y+) - log pi(y-)/pi_ref(y-)``,  ``L = mean (h - 1/(2 tau))^2``.

    The loss is minimal (zero) at ``h = 1/(2 tau)`` for every pair. The reported rewards are
    ``tau * log-ratio`` (TRL's convention, where tau is passed as beta). ``weights`` as for ``dpo_loss``.

    Which log-probabilities: the IPO authors, and TRL's ``loss_type="ipo"``, use the *mean* token log-prob of
    each response (the summed log-ratio divided by the response's length), so that ``1/(2 tau)`` is a
    per-token target whatever the lengths; ``rpo_lib.train`` does the same for ``method="ipo"`` unless told
    otherwise. With summed log-probs the same tau asks for a far larger gap on long responses.
    """
    tau = check_hyperparameter(tau, "tau", positive=True)
    chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    gap = chosen_ratio - rejected_ratio  # h, (B,)
    loss = weighted_mean((gap - 1.0 / (2.0 * tau)).pow(2), weights)
    chosen_rewards, rejected_rewards = (tau * chosen_ratio).detach(), (tau * rejected_ratio).detach()
    metrics = _reward_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps)
    metrics["loss/ipo"] = loss.detach()
    return PreferenceLoss(loss, chosen_rewards, rejected_rewards, metrics)


def sft_loss(token_logps: Tensor, mask: Tensor, *, normalization: Normalization = "seq_mean",
             token_count: float | None = None) -> Tensor:
    """Negative log-likelihood of (chosen) completions, with the normalisation made explicit.

    Args:
        token_logps: (B, T) per-token ``log pi(y_t | x, y_<t)``; positions outside ``mask`` are ignored
            (they may hold anything, NaN included).
        mask: (B, T) 1/True on completion tokens. Every row needs at least one token.
        normalization:
            - ``"sum"``: ``mean_b( -sum_t log p )``; the per-sequence NLL, scales with length.
            - ``"seq_mean"``: ``mean_b( -(1/n_b) sum_t log p )``; every sequence weighs the same.
            - ``"token_mean"``: ``-(sum_{b,t} log p) / (sum_b n_b)``; every token weighs the same, so long
              sequences weigh more.
        token_count: ``"token_mean"`` only: divide by this many tokens instead of this batch's own count.
            Gradient accumulation passes the whole batch's count (scaled to this micro-batch's share of the
            pairs), so that the accumulated gradient equals the full batch's; TRL's ``num_items_in_batch``.
    Returns:
        A scalar float32 tensor.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}; got {normalization!r}.")
    mask = check_token_inputs(token_logps, mask)
    # torch.where, not multiplication: 0 * NaN at a padded position would still be NaN.
    masked = torch.where(mask, to_float32(token_logps), torch.zeros((), dtype=torch.float32,
                                                                     device=token_logps.device))
    per_sequence = masked.sum(dim=1)  # (B,)
    if normalization == "sum":
        return -per_sequence.mean()
    lengths = mask.sum(dim=1).to(masked.dtype)  # (B,), all >= 1 after the check
    if normalization == "seq_mean":
        return -(per_sequence / lengths).mean()
    if token_count is not None:
        token_count = check_hyperparameter(token_count, "token_count", positive=True,
                                           hint=" (the number of completion tokens)")
        return -per_sequence.sum() / token_count
    return -per_sequence.sum() / lengths.sum()


Coefficient = Literal["eta", "sft_weight"]


@dataclass(frozen=True)
class RPOVariant:
    """One published form of RPO's SFT term (docs/math.md section 6): a normalisation and a coefficient.

    ``coefficient`` says which of ``rpo_loss``'s two arguments the source's number is: ``"eta"``, Liu et al.'s
    eta (the SFT term is multiplied by ``eta * beta``), or ``"sft_weight"``, a plain weight ``w`` on the SFT
    term (no beta). ``value`` is the published number, ``beta`` the published DPO beta where the source fixes one.
    """

    normalization: Normalization
    coefficient: Coefficient
    value: float
    beta: float | None
    source: str

    def kwargs(self, value: float | None = None) -> dict:
        """``rpo_loss`` arguments for this variant: its normalisation and its coefficient, set to ``value``
        (the published one by default). E.g. ``rpo_loss(..., beta=0.01, **RPO_VARIANTS["handbook"].kwargs())``."""
        return {"normalization": self.normalization, self.coefficient: self.value if value is None else value}

    def sft_weight(self, beta: float, value: float | None = None) -> float:
        """The multiplier of the SFT term at this ``beta``: ``eta * beta`` or ``w``."""
        value = self.value if value is None else value
        return value * beta if self.coefficient == "eta" else value


RPO_VARIANTS: dict[str, RPOVariant] = {
    "handbook": RPOVariant("sum", "eta", 0.005, beta=0.01,
                           source="Liu et al.'s alignment-handbook patch, zephyr-7b-beta: the reparameterised "
                                  "maximin, eta in the paper's convention"),
    "openrlhf": RPOVariant("seq_mean", "sft_weight", 0.2, beta=0.5,
                           source="Liu et al.'s OpenRLHF patch, zephyr-gemma ('generally better'); their code "
                                  "calls the weight eta, but it multiplies a per-sequence mean and no beta"),
    "trl": RPOVariant("token_mean", "sft_weight", 1.0, beta=None,
                      source="TRL >= 0.29: loss_type=['sigmoid','sft'], loss_weights=[1, w] (formerly rpo_alpha, "
                             "recommended 1.0); beta is yours (TRL's default is 0.1)"),
}


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    *,
    beta: float,
    eta: float | None = None,
    sft_weight: float | None = None,
    normalization: Normalization = "sum",
    token_count: float | None = None,
) -> PreferenceLoss:
    """RPO (Liu et al. 2024): DPO plus an SFT loss on the chosen responses (docs/math.md section 6).

    Give exactly one coefficient:

    - ``eta``, Liu et al.'s eta: ``L = L_DPO + eta * beta * sft_loss``. With ``normalization="sum"`` (the
      default) this is the reparameterised maximin ``max_pi min_r {eta * (E_pi r - E_base r - beta KL) +
      L_D(r)}`` with ``pi_base`` = the chosen responses: eta = 0 is DPO, and the authors' published
      eta = 0.005 (beta = 0.01) means exactly this.
    - ``sft_weight`` ``w``: ``L = L_DPO + w * sft_loss``, the plain coefficient of the OpenRLHF and TRL forms.
      In the summed form, ``w = eta * beta``.

    The published variants (``RPO_VARIANTS``) differ in more than scale. ``"seq_mean"`` and ``"token_mean"``
    weight sequences by length differently from ``"sum"`` (a long chosen response counts once per token
    under ``"sum"``, once in all under ``"seq_mean"``), so they can prefer a different update on the same
    batch; only the summed, times-beta form is the maximin of the paper:

    =========== ============================================ ================================= ===================
    variant     SFT term                                     arguments                         published
    =========== ============================================ ================================= ===================
    handbook    ``eta * beta * mean_b(-sum_t log p)``        ``normalization="sum", eta=``     eta 0.005, beta 0.01
    openrlhf    ``w * mean_b(-(1/n_b) sum_t log p)``         ``"seq_mean", sft_weight=``       w 0.2, beta 0.5
    trl         ``w * (-sum_{b,t} log p / n_tokens)``        ``"token_mean", sft_weight=``     w 1.0
    =========== ============================================ ================================= ===================

    ``RPO_VARIANTS[name].kwargs()`` returns a variant's arguments with its published coefficient.

    Args:
        policy_chosen_logps ... ref_rejected_logps: (B,) sequence log-probs, as for ``dpo_loss``.
        chosen_token_logps: (B, T) per-token log-probs of the chosen completions under the policy.
        chosen_mask: (B, T) completion mask of the chosen responses.
        beta: DPO's beta (> 0). eta / sft_weight: the SFT coefficient (>= 0), exactly one of them.
        token_count: passed to ``sft_loss`` (``"token_mean"`` under gradient accumulation).
    """
    if (eta is None) == (sft_weight is None):
        raise ValueError("rpo_loss needs exactly one of eta (Liu et al.'s, multiplied by beta) and sft_weight "
                         "(a plain weight on the SFT term); "
                         + ("both were given." if eta is not None else "neither was given."))
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   beta=beta)
    if eta is not None:
        weight = check_hyperparameter(eta, "eta", hint=" (0 turns RPO into DPO)") * beta
    else:
        weight = check_hyperparameter(sft_weight, "sft_weight", hint=" (0 turns RPO into DPO)")
    if chosen_token_logps.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(
            f"chosen_token_logps has {chosen_token_logps.shape[0]} rows but the batch has "
            f"{policy_chosen_logps.shape[0]} pairs: pass the chosen responses' token log-probs."
        )
    sft = sft_loss(chosen_token_logps, chosen_mask, normalization=normalization, token_count=token_count)
    loss = dpo.loss + weight * sft  # Liu et al. 2024, Algorithm 2 (practical RPO)
    metrics = dict(dpo.metric_tensors)
    metrics.update({"loss/sft": sft.detach(), "loss/sft_weighted": weight * sft.detach()})
    return PreferenceLoss(loss, dpo.chosen_rewards, dpo.rejected_rewards, metrics)


def rpo_variant_losses(*batch: Tensor, beta: float,
                       variants: dict[str, RPOVariant] | None = None) -> dict[str, Tensor]:
    """Each published RPO form's loss on one batch, with its own normalisation and published coefficient.

    ``batch`` is ``rpo_loss``'s six tensors, in its order (the four (B,) sequence log-probs, the (B, T) chosen token
    log-probs and their mask). Compare the result across candidate updates to see that the forms can prefer
    different updates (notebook 05). ``variants`` defaults to ``RPO_VARIANTS``.
    """
    if len(batch) != 6:
        raise ValueError(f"pass rpo_loss's six tensors (four sequence log-probs, token log-probs, mask); "
                         f"got {len(batch)}.")
    variants = RPO_VARIANTS if variants is None else variants
    return {name: rpo_loss(*batch, beta=beta, **variant.kwargs()).loss for name, variant in variants.items()}


def rloo_advantages(kl_per_sample: Tensor) -> Tensor:
    """RLOO's factors ``kl_i - mean_{j != i} kl_j`` for (B, k) per-sample kl values, k >= 2 per prompt.

    Each sample's baseline is the mean of the *other* samples of its prompt, so it is independent of the sample
    and the estimate stays unbiased (Kool et al. 2019; docs/math.md section 7).
    """
    k = kl_per_sample.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt; got k={k}.")
    leave_one_out = (kl_per_sample.sum(dim=-1, keepdim=True) - kl_per_sample) / (k - 1)  # (B, k)
    return kl_per_sample - leave_one_out


def online_kl_loss(
    sample_logps: Tensor,
    ref_sample_logps: Tensor,
    *,
    baseline: Literal["rloo", "none"] = "rloo",
) -> tuple[Tensor, Tensor]:
    """Reverse KL ``KL(pi || pi_ref)`` from the policy's own samples, with a REINFORCE gradient (math.md 7).

    For ``y ~ pi`` the sequence-level ``kl(y) = log pi(y|x) - log pi_ref(y|x)`` has mean ``KL(pi||pi_ref)``
    and ``grad E[kl] = E[sg(kl(y)) grad log pi(y)]`` (the ``E[grad log pi]`` term vanishes). With RLOO each
    sample's baseline is the mean ``kl`` of the other ``k-1`` samples of the same prompt, independent of
    that sample, so the estimate stays unbiased:

    ``surrogate = mean_{b,i} sg(kl_i - mean_{j != i} kl_j) * log pi(y_i)``

    The baseline pays off for sequences: ``kl(y)`` sums over tokens, so each token's score is multiplied
    by the other tokens' kl, an offset of size ~KL that the baseline removes (variance ratio RLOO/none,
    k=2, measured in tests/test_losses.py: 0.34 at 16 tokens, 0.13 at 32). For a single categorical draw
    the baseline's own noise can dominate and the variance rises (ratio ~2.5): not a free lunch.

    Args:
        sample_logps: (B, k) ``log pi_theta(y_i|x_b)`` of k samples per prompt drawn from the current
            policy, summed over generated tokens, differentiable in theta.
        ref_sample_logps: (B, k) the same samples under the reference policy.
        baseline: ``"rloo"`` (k >= 2) or ``"none"`` (plain REINFORCE, k >= 1; for comparisons).
    Returns:
        ``(loss, kl)``: ``loss`` is a scalar whose *gradient* is the unbiased estimate above and whose
        *value* equals ``kl`` (the surrogate is shifted by a detached constant so that a logged loss reads
        as a KL); ``kl`` is the detached Monte-Carlo estimate ``mean_{b,i} kl_i`` of ``KL(pi||pi_ref)``.
    """
    if baseline not in ("rloo", "none"):
        raise ValueError(f"baseline must be 'rloo' or 'none'; got {baseline!r}.")
    for name, tensor in (("sample_logps", sample_logps), ("ref_sample_logps", ref_sample_logps)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape (B, k), k samples per prompt; got {shape}.")
        check_not_empty(tensor, name)
        check_finite(tensor, name)
    if sample_logps.shape != ref_sample_logps.shape:
        raise ValueError(
            f"sample_logps has shape {tuple(sample_logps.shape)} but ref_sample_logps has shape "
            f"{tuple(ref_sample_logps.shape)}: score the same samples under both policies."
        )
    k = sample_logps.shape[1]
    if baseline == "rloo" and k < 2:
        raise ValueError(
            f"RLOO needs k >= 2 samples per prompt (the baseline of one sample is the others' mean); got "
            f"k={k}. Sample more per prompt, or pass baseline='none'."
        )
    logps = to_float32(sample_logps)
    kl_per_sample = (logps - to_float32(ref_sample_logps)).detach()  # (B, k), sg(kl_i)
    kl = kl_per_sample.mean()
    advantage = rloo_advantages(kl_per_sample) if baseline == "rloo" else kl_per_sample
    surrogate = (advantage * logps).mean()
    loss = surrogate - surrogate.detach() + kl  # value = KL estimate, gradient = REINFORCE estimate
    return loss, kl


def hypo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    sample_logps: Tensor,
    ref_sample_logps: Tensor,
    *,
    beta: float,
    lam: float,
) -> PreferenceLoss:
    """HyPO (Song et al. 2024, eq. 7): offline DPO plus ``lam`` times the online reverse KL (math.md 7).

    ``L = L_DPO + lam * E_{x~D, y~pi_theta}[log pi_theta(y|x) - log pi_ref(y|x)]``, the KL term estimated
    by ``online_kl_loss`` (RLOO) from k >= 2 samples per prompt of the current policy.

    Args:
        policy_chosen_logps ... ref_rejected_logps: (B,) offline pairs, as for ``dpo_loss``.
        sample_logps, ref_sample_logps: (B', k) online samples (B' prompts, need not equal B).
        beta: DPO's beta (> 0). lam: weight of the reverse-KL term (>= 0; 0 gives DPO).
    """
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   beta=beta)
    online = hypo_online_term(sample_logps, ref_sample_logps, lam=lam)
    return PreferenceLoss(dpo.loss + online.loss, dpo.chosen_rewards, dpo.rejected_rewards,
                          {**dpo.metric_tensors, **online.metric_tensors})


def hypo_online_term(sample_logps: Tensor, ref_sample_logps: Tensor, *, lam: float) -> LossTerm:
    """HyPO's online term alone: ``lam * online_kl_loss(...)``, with metrics ``kl/online`` and ``loss/kl_weighted``.

    ``hypo_loss`` is ``dpo_loss`` plus this term. A training loop may backpropagate the two separately (the
    gradient of a sum is the sum of the gradients), so that the offline pairs' activations are freed before
    the online samples are scored; ``rpo_lib.train`` does.
    """
    lam = check_hyperparameter(lam, "lam", hint=" (0 turns HyPO into DPO)")
    kl_loss, kl = online_kl_loss(sample_logps, ref_sample_logps)
    return LossTerm(lam * kl_loss, {"kl/online": kl, "loss/kl_weighted": lam * kl})
