"""Padding-free batches: sequences packed into rows, with attention that never crosses a sequence boundary.

A padded batch of prompt + completion rows spends compute on padding: with UltraFeedback-like lengths (a long
tail up to 1,024 tokens) half of a padded batch can be padding. Packing puts several sequences end to end in one
row, so every position is a real token, and scores each sequence exactly as if it were alone:

- **Positions restart** at 0 for every sequence (``position_ids``), so rotary embeddings see the same positions.
- **Attention is block-causal**: a token attends only to earlier tokens *of its own sequence*. Measured with
  transformers 5.23 (``tests/test_packing.py``): restarting ``position_ids`` together with a 2D attention mask of
  ones (what a padded collator passes) does NOT isolate the sequences under ``sdpa``: the second sequence attends
  to the first. Two paths do:
  ``attention="mask"`` passes a 4D float mask of shape (R, 1, L, L), 0 where attention is allowed and the dtype's
  minimum elsewhere (``PackedBatch.block_causal_mask``); it works for ``sdpa`` and ``eager`` but costs an L x L
  mask per row, so keep rows to a few thousand tokens. ``attention="varlen"`` passes no mask at all: transformers
  then reads the boundaries from the restarting ``position_ids`` (``sdpa`` on CPU: tested equal to padded
  batches; ``flash_attention_2`` on a GPU runs true variable-length attention that way, untested here).
- **Scoring**: the one-position shift of ``rpo_lib.logprobs`` is unchanged. The logit at the last token of one
  sequence predicts the first token of the next, which is a prompt token (every prompt has at least one token),
  so the completion mask already drops it. Per-sequence sums are gathered back into the original order.

Only the completion positions need logits: ``packed_completion_logprobs`` takes the model's final hidden states
and projects only the completion positions onto the vocabulary, in chunks (``rpo_lib.logprobs``), so a 128k
vocabulary at 4,096 tokens never materialises the whole (T, V) block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from rpo_lib.logprobs import DEFAULT_CHUNK_ELEMENTS, Reduction, linear_label_logprobs, reduce_token_logprobs
from rpo_lib.models import compute_dtype

__all__ = ["PackedBatch", "pack_sequences", "packed_completion_logprobs", "packed_token_logprobs", "padding_fraction"]


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into R rows of L positions.

    Attributes:
        input_ids: (R, L) tokens; positions after the last sequence of a row hold ``pad_token_id``.
        position_ids: (R, L) position of each token *within its own sequence* (restarts at 0).
        completion_mask: (R, L) 1 on completion tokens.
        sequence_index: (R, L) index of the sequence (in the order given to ``pack_sequences``) that owns each
            position; -1 on the padding at the end of a row.
        n_sequences: number of sequences packed.
        lengths: (n_sequences,) prompt + completion length of every sequence, in the original order.
    """

    input_ids: Tensor
    position_ids: Tensor
    completion_mask: Tensor
    sequence_index: Tensor
    n_sequences: int
    lengths: Tensor

    @property
    def real_tokens(self) -> int:
        return int((self.sequence_index >= 0).sum())

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.completion_mask.to(device),
                           self.sequence_index.to(device), self.n_sequences, self.lengths)

    def block_causal_mask(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(R, 1, L, L) additive mask: 0 where query i may attend key j (same sequence, j <= i), else dtype min.

        Padding positions attend to themselves only, so no row of the softmax is empty (no NaN).
        """
        index = self.sequence_index
        length = index.shape[1]
        same = index[:, :, None] == index[:, None, :]  # (R, L, L)
        causal = torch.ones(length, length, dtype=torch.bool, device=index.device).tril()
        allowed = same & causal
        allowed |= torch.eye(length, dtype=torch.bool, device=index.device)  # padding: itself
        mask = torch.zeros(allowed.shape, dtype=dtype, device=index.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, max_row_tokens: int,
                   pad_token_id: int) -> PackedBatch:
    """Pack ``prompt + completion`` sequences into rows of at most ``max_row_tokens`` positions.

    First-fit decreasing: the longest sequences are placed first, each in the first row with room. Rows have the
    length of the fullest row (at most ``max_row_tokens``). Every prompt needs at least one token (so that the
    boundary between two packed sequences is never scored) and no sequence may exceed ``max_row_tokens``.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: pass one of each per sequence.")
    if not prompts:
        raise ValueError("no sequences to pack: pass at least one prompt and completion.")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    for i, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
        if len(prompt) == 0:
            raise ValueError(f"sequence {i} has an empty prompt; packing needs at least one prompt token (e.g. BOS) "
                             "so that the token before a completion belongs to the same sequence.")
        if length > max_row_tokens:
            raise ValueError(f"sequence {i} has {length} tokens, more than max_row_tokens={max_row_tokens}: raise "
                             "max_row_tokens or truncate the data first (rpo_lib.data's max_length).")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_row_tokens - lengths[i])
    width = max(max_row_tokens - free for free in room)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            prompt, completion = list(prompts[i]), list(completions[i])
            stop = start + lengths[i]
            input_ids[r, start:stop] = torch.tensor(prompt + completion, dtype=torch.long)
            position_ids[r, start:stop] = torch.arange(lengths[i])
            completion_mask[r, start + len(prompt):stop] = 1
            sequence_index[r, start:stop] = i
            start = stop
    return PackedBatch(input_ids, position_ids, completion_mask, sequence_index, len(lengths),
                       torch.tensor(lengths, dtype=torch.long))


def padding_fraction(lengths: Sequence[int], *, packed_rows: int | None = None, row_tokens: int | None = None) -> float:
    """Share of positions that are padding: in a right-padded batch of ``lengths`` (default), or in a packed
    batch of ``packed_rows`` rows of ``row_tokens`` positions."""
    real = sum(lengths)
    total = len(lengths) * max(lengths) if packed_rows is None else packed_rows * int(row_tokens or 0)
    if total <= 0:
        raise ValueError("the batch has no positions: pass lengths, or packed_rows and row_tokens.")
    return 1.0 - real / total


def _backbone(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    return base.model, base.lm_head


def packed_token_logprobs(model: Any, batch: PackedBatch, *, attention: Literal["mask", "varlen"] = "mask",
                          chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Score every packed sequence's completion tokens: ``(token_logps (N, C), mask (N, C))`` in input order.

    Row ``i`` holds sequence ``i``'s completion log-probs, left-aligned, ``C`` the longest completion; ``mask`` marks
    the real ones. This is the layout ``rpo_lib.logprobs.completion_logprobs`` returns for padded rows (there with
    the prompt positions masked out as well), so the losses take either.

    ``model`` is a Hugging Face causal LM (a peft wrapper is fine). Its decoder runs once over the packed rows;
    only the completion positions (and their targets) are projected onto the vocabulary, in chunks of at most
    ``chunk_elements`` float32 logits. ``attention="mask"`` passes ``batch.block_causal_mask`` (sdpa, eager;
    CPU or GPU); ``"varlen"`` passes no mask and lets transformers read the boundaries from the restarting
    ``position_ids`` (``sdpa`` under transformers 5.23, tested; ``flash_attention_2`` on a GPU).
    """
    decoder, lm_head = _backbone(model)
    device = batch.input_ids.device
    if attention == "mask":
        mask = batch.block_causal_mask(dtype=compute_dtype(model)).to(device)
    elif attention == "varlen":
        mask = None
    else:
        raise ValueError(f"attention must be 'mask' or 'varlen'; got {attention!r}.")
    hidden = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                     use_cache=False).last_hidden_state  # (R, L, H)
    scored = batch.completion_mask[:, 1:].bool()  # position t predicts token t+1: targets that are completions
    rows, cols = torch.nonzero(scored, as_tuple=True)
    states = hidden[rows, cols]  # (P, H): only the positions that are scored
    targets = batch.input_ids[rows, cols + 1]  # (P,)
    owner = batch.sequence_index[rows, cols + 1]  # (P,)
    if getattr(lm_head, "bias", None) is None and isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        values = linear_label_logprobs(states, lm_head.weight, targets, chunk_elements=chunk_elements)
    else:  # an LM head with a bias or an adapter of its own: project the scored positions, then pick
        logits = lm_head(states)
        values = (logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1))
    n = batch.n_sequences
    counts = torch.zeros(n, dtype=torch.long, device=device).index_add(0, owner, torch.ones_like(owner))
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"sequences {missing[:5]} have no completion token to score: drop empty completions first "
                         "(rpo_lib.data does and counts them).")
    # A sequence's scored positions are contiguous (one row, increasing columns), so its k-th is at first + k.
    index = torch.arange(owner.shape[0], device=device)
    first = torch.full((n,), owner.shape[0], dtype=torch.long, device=device).scatter_reduce(
        0, owner, index, reduce="amin")
    column = index - first[owner]
    width = int(counts.max())
    token_logps = torch.zeros((n, width), dtype=values.dtype, device=device).index_put((owner, column), values)
    token_mask = torch.arange(width, device=device)[None, :] < counts[:, None]
    return token_logps, token_mask


def packed_completion_logprobs(model: Any, batch: PackedBatch, *, reduction: Reduction = "sum",
                               attention: Literal["mask", "varlen"] = "mask",
                               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """``(sequence_logps (N,), token_counts (N,))`` in input order: ``packed_token_logprobs`` summed, or averaged
    over each completion's tokens with ``reduction="mean"``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}.")
    token_logps, mask = packed_token_logprobs(model, batch, attention=attention, chunk_elements=chunk_elements)
    return reduce_token_logprobs(token_logps, mask, reduction=reduction), mask.sum(dim=1)
