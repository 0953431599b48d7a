"""Per-token and per-sequence log-probabilities of labels under a causal language model's logits.

The one-position shift (the logits at position t predict the token at t+1) and the completion mask are
handled here and nowhere else. Sum versus mean over tokens is an explicit ``reduction`` argument
(math.md section 3: DPO's ``log pi(y|x)`` is the *sum* over completion tokens).

Memory: ``log_softmax(logits.float())`` on bf16 logits of shape (B, T, V) allocates a float32 copy twice
the size of the logits, and autograd keeps it for the backward pass; at V = 128k that is the largest
tensor of a training step. ``token_logprobs`` instead walks over row chunks of at most
``chunk_elements`` logits, upcasting one chunk at a time, and saves only the original logits and one
float32 log-normaliser per position for a backward pass that recomputes the softmax chunk by chunk. Peak
extra float32 memory: ``chunk_elements`` values plus O(B*T). (Double backward is not supported.)
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from rpo_lib._checks import check_token_inputs, require

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "completion_logprobs", "reduce_token_logprobs", "sequence_logprobs",
           "token_logprobs"]

Reduction = Literal["sum", "mean"]
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M float32 values = 16 MiB per chunk


def _pick(block: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """For float32 logits (n, V) and targets (n,): ``(log_softmax(block)[targets], logsumexp(block))``."""
    lse = torch.logsumexp(block, dim=-1)
    return block.gather(1, targets[:, None]).squeeze(1) - lse, lse


def _pick_backward(block: Tensor, lse: Tensor, targets: Tensor, upstream: Tensor) -> Tensor:
    """Gradient of ``upstream * log_softmax(block)[targets]`` w.r.t. the float32 logits ``block`` (n, V):
    ``upstream * (onehot(target) - softmax(block))``, in a new tensor (``block`` may be the caller's logits)."""
    grad = torch.exp(block - lse[:, None]).mul_(-upstream)
    return grad.scatter_add_(1, targets[:, None], upstream)


class _LabelLogProbs(torch.autograd.Function):
    """``out[b, t] = log_softmax(logits[b, t])[targets[b, t]]`` in float32, chunked (see module doc)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:  # (B,T,V), (B,T) -> (B,T)
        batch, length, _ = logits.shape
        out = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
        log_normaliser = torch.empty_like(out)
        for b in range(batch):  # rows of one sequence are contiguous: no copy of the logits is made
            for start in range(0, length, chunk_rows):
                stop = min(start + chunk_rows, length)
                block = logits[b, start:stop].float()  # (n, V): the only float32 logits alive
                out[b, start:stop], log_normaliser[b, start:stop] = _pick(block, targets[b, start:stop])
                del block
        ctx.save_for_backward(logits, targets, log_normaliser)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, log_normaliser = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        batch, length, _ = logits.shape
        for b in range(batch):
            for start in range(0, length, ctx.chunk_rows):
                stop = min(start + ctx.chunk_rows, length)
                block = _pick_backward(logits[b, start:stop].float(), log_normaliser[b, start:stop],
                                       targets[b, start:stop], grad_out[b, start:stop, None].float())
                grad_logits[b, start:stop] = block.to(grad_logits.dtype)
                del block
        return grad_logits, None, None


def token_logprobs(
    logits: Tensor,
    labels: Tensor,
    completion_mask: Tensor,
    *,
    shift: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the label tokens, and the mask of the positions that count.

    Args:
        logits: (B, T, V) model outputs, any float dtype (bf16 is not upcast as a whole).
        labels: (B, T) token ids; with ``shift=True`` these are the model's ``input_ids``.
        completion_mask: (B, T) 1/True where ``labels`` is a completion token (prompt and padding 0).
        shift: if True, logits at position t score ``labels[:, t+1]`` (the usual causal-LM layout; the
            first token has nothing before it and is never scored); if False, logits and labels are
            already aligned.
        chunk_elements: upper bound on float32 logits materialised at once.
    Returns:
        ``(token_logps, mask)``: float32 (B, T') and bool (B, T'), T' = T-1 with shift, else T.
        ``token_logps`` is 0 outside the mask.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (B, T, V).")
    if labels.shape != logits.shape[:2] or completion_mask.shape != labels.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and completion_mask {tuple(completion_mask.shape)} must both have "
            f"shape (B, T) = {tuple(logits.shape[:2])}, one entry per logits position."
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point; got {logits.dtype}.")
    mask = completion_mask.bool()
    if shift:
        # Position t predicts labels[t+1]; the last position predicts nothing and is dropped.
        targets = torch.cat([labels[:, 1:], labels[:, :1]], dim=1)
        mask = mask[:, 1:]
    else:
        targets = labels
    vocab = logits.shape[-1]
    # Masked labels may be -100 or out of range: any valid id will do, the result is zeroed there.
    full_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1) if shift else mask
    targets = torch.where(full_mask, targets, torch.zeros_like(targets)).long()
    valid = (targets >= 0) & (targets < vocab)
    require(valid.all(), lambda: f"a completion label lies outside the vocabulary [0, {vocab}): check that the "
                                 f"tokenizer belongs to the model (len(tokenizer) <= the model's vocab_size).")
    targets = torch.where(valid, targets, torch.zeros_like(targets))  # a deferred check must not index out of range
    chunk_rows = max(1, int(chunk_elements) // vocab)
    values = _LabelLogProbs.apply(logits, targets, chunk_rows)  # (B, T)
    if shift:
        values = values[:, :-1]
    token_logps = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return token_logps, mask


def reduce_token_logprobs(token_logps: Tensor, mask: Tensor, *, reduction: Reduction = "sum") -> Tensor:
    """Sequence log-probabilities (B,) from token log-probs (B, T): ``sum`` or ``mean`` over the mask.

    ``"sum"`` is ``log pi(y|x)`` exactly (math.md section 3); ``"mean"`` is the per-token average some
    methods use (IPO in TRL, SimPO). A sequence with no masked-in token raises ``ValueError``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}.")
    mask = check_token_inputs(token_logps, mask)
    totals = torch.where(mask, token_logps.float(), torch.zeros((), device=token_logps.device)).sum(dim=1)
    return totals if reduction == "sum" else totals / mask.sum(dim=1)


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    completion_mask: Tensor,
    *,
    reduction: Reduction = "sum",
    shift: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """``log pi(y|x)`` per sequence, shape (B,): ``token_logprobs`` then ``reduce_token_logprobs``."""
    token_logps, mask = token_logprobs(logits, labels, completion_mask, shift=shift,
                                       chunk_elements=chunk_elements)
    return reduce_token_logprobs(token_logps, mask, reduction=reduction)


def completion_logprobs(
    model: Callable[..., Any],
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    reduction: Reduction = "sum",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run a causal LM on prompt+completion rows and score the completions.

    Args:
        model: a Hugging Face causal LM (called with ``input_ids``, ``attention_mask`` and ``use_cache=False``:
            a scoring pass has no use for a KV cache, which would only take memory).
        input_ids, attention_mask: (B, T) the tokenised prompt + completion, right-padded.
        completion_mask: (B, T) 1 on completion tokens only.
    Returns:
        ``(sequence_logps (B,), token_logps (B, T-1), mask (B, T-1))``: the first feeds the preference
        losses, the other two feed ``rpo_lib.losses.sft_loss``.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    token_logps, mask = token_logprobs(logits, input_ids, completion_mask, chunk_elements=chunk_elements)
    return reduce_token_logprobs(token_logps, mask, reduction=reduction), token_logps, mask
