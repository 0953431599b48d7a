"""One loss function per method, in a table: ``STEPS[config.method]`` is where a method's step lives.

A step function takes the trainer, the indices of one micro-batch, the micro-batch's ``share`` of the (global)
batch, the batch's completion ``token_count`` (for token-mean SFT normalisation) and, for HyPO, the online
``samples`` drawn for these prompts. It yields the micro-batch's loss, already weighted by ``share``, as terms to
backpropagate one after the other, each with its metrics (detached tensors). The losses themselves are
``rpo_lib.losses``' pure functions; these functions only feed them.

Log-probabilities ``log pi(y|x)`` of the pairs are reduced by ``config.reduction`` (sums for DPO, RPO and HyPO;
means for IPO). HyPO's online term always uses sums: it estimates ``KL(pi || pi_ref)`` of whole responses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from torch import Tensor

from rpo_lib import losses
from rpo_lib.sample import Samples

if TYPE_CHECKING:
    from rpo_lib.train.trainer import Trainer

__all__ = ["STEPS", "Step", "dpo_step", "hypo_step", "ipo_step", "rpo_step", "sft_step"]

Terms = Iterator[tuple[Tensor, dict[str, Tensor]]]
Step = Callable[["Trainer", list[int], float, float, "Samples | None"], Terms]


def sft_step(trainer: Trainer, indices: list[int], share: float, token_count: float,
             samples: Samples | None = None) -> Terms:
    """Supervised fine-tuning: the NLL of the completions, normalised by ``config.sft_normalization``
    (docs/math.md section 6; ``losses.sft_loss``)."""
    normalization = trainer.config.sft_normalization
    batch = trainer._to_device(trainer.collate([trainer.examples[i] for i in indices]))
    _, token_logps, mask = trainer._forward(trainer.train_model, batch)
    loss = losses.sft_loss(token_logps, mask, normalization=normalization,
                           token_count=token_count * share if normalization == "token_mean" else None)
    # Metrics are summed with weight `share`: with token_count, share * loss sums to the batch's mean.
    yield loss * share, {"loss/sft": loss.detach()}


def _scored_pairs(trainer: Trainer, indices: list[int]
                  ) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor, Tensor]:
    """``(policy_chosen, policy_rejected, ref_chosen, ref_rejected)`` of the pairs ``indices``, and the policy's
    token log-probs and mask of the rows (chosen rows first). The reference is scored first (or read from its
    precomputed table), so that its working set is gone when the policy's activations are alive."""
    batch = trainer._to_device(trainer.collate([trainer.examples[i] for i in indices]))
    b = len(indices)
    table = trainer.reference.precomputed(indices)
    if table is not None:
        ref_chosen, ref_rejected = (t.to(trainer.device) for t in table)
    else:
        ref_logps = trainer.logprobs(batch, reference=True)
        ref_chosen, ref_rejected = ref_logps[:b], ref_logps[b:]
    logps, token_logps, mask = trainer._forward(trainer.train_model, batch)
    return (logps[:b], logps[b:], ref_chosen, ref_rejected), token_logps, mask


def dpo_step(trainer: Trainer, indices: list[int], share: float, token_count: float,
             samples: Samples | None = None) -> Terms:
    """DPO (docs/math.md section 3; ``losses.dpo_loss``)."""
    pairs, _, _ = _scored_pairs(trainer, indices)
    out = losses.dpo_loss(*pairs, beta=trainer.config.beta)
    yield out.loss * share, out.metric_tensors


def ipo_step(trainer: Trainer, indices: list[int], share: float, token_count: float,
             samples: Samples | None = None) -> Terms:
    """IPO with ``tau = config.beta`` (``losses.ipo_loss``), on mean token log-probs unless told otherwise."""
    pairs, _, _ = _scored_pairs(trainer, indices)
    out = losses.ipo_loss(*pairs, tau=trainer.config.beta)
    yield out.loss * share, out.metric_tensors


def rpo_step(trainer: Trainer, indices: list[int], share: float, token_count: float,
             samples: Samples | None = None) -> Terms:
    """RPO = DPO + the SFT loss of the chosen responses (docs/math.md section 6; ``losses.rpo_loss``), with the
    normalisation and coefficient of ``config.rpo_kwargs()``."""
    config = trainer.config
    pairs, token_logps, mask = _scored_pairs(trainer, indices)
    b, rpo = len(indices), config.rpo_kwargs()
    out = losses.rpo_loss(*pairs, token_logps[:b], mask[:b], beta=config.beta, **rpo,
                          token_count=token_count * share if rpo["normalization"] == "token_mean" else None)
    yield out.loss * share, out.metric_tensors


def hypo_step(trainer: Trainer, indices: list[int], share: float, token_count: float,
              samples: Samples | None = None) -> Terms:
    """HyPO = the offline DPO loss + ``lam`` times the online reverse KL (docs/math.md section 7).

    The DPO term is yielded (and backpropagated) first; only then are the online ``samples`` scored, with
    gradients under the policy (the REINFORCE term) and without under ``pi_ref``, so that the two never hold
    activations at the same time. ``losses.hypo_online_term`` forms the leave-one-out (RLOO) estimate over the
    ``k_online`` samples of each prompt."""
    config = trainer.config
    b = len(indices)
    if samples is None or len(samples.completion_ids) != b * config.k_online:
        raise ValueError(f"HyPO needs {config.k_online} online samples for each of the {b} prompts.")
    yield from dpo_step(trainer, indices, share, token_count)  # its graph is spent when it returns
    online = samples.batch()
    sample_logps = trainer._forward(trainer.train_model, online, "sum")[0]  # with gradients: the REINFORCE term
    ref_sample_logps = trainer.logprobs(online, reference=True, reduction="sum")
    term = losses.hypo_online_term(sample_logps.view(b, config.k_online), ref_sample_logps.view(b, config.k_online),
                                   lam=config.lam)
    yield term.loss * share, term.metric_tensors


STEPS: dict[str, Step] = {"sft": sft_step, "dpo": dpo_step, "ipo": ipo_step, "rpo": rpo_step, "hypo": hypo_step}

