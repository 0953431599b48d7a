"""Padding-free batches: sequences packed into rows, with attention that never crosses a sequence boundary.

A padded batch of prompt + completion rows spends compute on padding: with UltraFeedback-like lengths (a long
tail up to 1,024 tokens) half of a padded batch can be padding. Packing puts several sequences end to end in one
row, so every position is a real token, and scores each sequence exactly as if it were alone:

- **Positions restart** at 0 for every sequence (``position_ids``), so rotary embeddings see the same positions.
- **Attention is block-causal**: a token attends only to earlier tokens *of its own sequence*. Measured with
  transformers 5.23 (``tests/test_packing.py``): restarting ``position_ids`` together with a 2D attention mask of
  ones (what a padded collator passes) does NOT isolate the sequences under ``sdpa``: the second sequence attends
  to the first. Two paths do (``attention_mask``):
  ``attention="mask"`` passes a 4D float mask of shape (R, 1, L, L), 0 where attention is allowed and the dtype's
  minimum elsewhere (``PackedBatch.block_causal_mask``), windowed on the layers that slide (Mistral, Phi-3,
  Gemma-2/3, Qwen2 with ``use_sliding_window``); it works for ``sdpa`` and ``eager`` but costs an L x L mask per
  row, so keep rows to a few thousand tokens. ``attention="varlen"`` passes no mask at all: transformers then reads
  the boundaries from the restarting ``position_ids`` and builds each layer's mask itself (``sdpa``, ``eager``),
  or runs true variable-length attention (``flash_attention_2`` on a GPU).
- **Scoring goes through the model's own forward**, wrapped as the trainer holds it (PEFT, DDP, FSDP2: their hooks
  run), so whatever the model does to its logits is done (Gemma-2's final soft-capping, Cohere's logit scale). The
  one-position shift of ``rpo_lib.logprobs`` is unchanged. The logit at the last token of one sequence predicts the
  first token of the next, which is a prompt token (every prompt has at least one token), so the completion mask
  already drops it. Per-sequence sums are gathered back into the original order.
- **Exact or refused.** ``tests/test_families.py`` checks one training step, packed against padded (loss and every
  gradient), on tiny configs of 13 decoder families under both attention modes. What cannot be exact is refused
  (``unsupported``: OPT and Falcon under ``"varlen"``, ALiBi), and the trainer scores its 2 shortest pairs both
  ways before it trains (``rpo_lib.train``), so a family nobody listed that leaks across sequences is refused too.

Only the completion positions need logits: the model is called with ``logits_to_keep`` set to a boolean mask of the
positions whose next token is a completion token, so its output head runs on those P positions only; the (P, V)
logits are in the compute dtype and their float32 log-softmax is taken in chunks (``rpo_lib.logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from rpo_lib.logprobs import DEFAULT_CHUNK_ELEMENTS, Reduction, reduce_token_logprobs, token_logprobs
from rpo_lib.models import base_model, compute_dtype

__all__ = ["PackedBatch", "attention_mask", "pack_sequences", "packed_completion_logprobs", "packed_token_logprobs",
           "padding_fraction", "sliding_window_layers", "unsupported"]


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

    def block_causal_mask(self, dtype: torch.dtype = torch.float32, window: int | None = None) -> Tensor:
        """(R, 1, L, L) additive mask: 0 where query i may attend key j (same sequence, j <= i, and with a
        ``window``, i - j < window: transformers' sliding window), else dtype min.

        Padding positions attend to themselves only, so no row of the softmax is empty (no NaN).
        """
        index = self.sequence_index
        length = index.shape[1]
        same = index[:, :, None] == index[:, None, :]  # (R, L, L)
        causal = torch.ones(length, length, dtype=torch.bool, device=index.device).tril()
        if window is not None:
            causal &= ~torch.ones(length, length, dtype=torch.bool, device=index.device).tril(-window)
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


# Families whose packed rows cannot be scored exactly under one attention mode, and why (the model class name, as
# ``type(model).__name__``). Found by tests/test_families.py, which also checks that every other family is exact.
_REFUSED: dict[str, dict[str, str]] = {
    "OPTForCausalLM": {"varlen": "its mask is built without position_ids, so the restarting positions do not "
                                 "separate the packed sequences"},
    "FalconForCausalLM": {"varlen": "its mask is built without position_ids, so the restarting positions do not "
                                    "separate the packed sequences"},
}


def _text_config(model: Any) -> Any:
    config = getattr(base_model(model), "config", None)
    return getattr(config, "text_config", None) or config


def sliding_window_layers(model: Any) -> tuple[int | None, bool]:
    """``(window, every_layer)``: the sliding-window width of ``model``'s windowed layers (None: no layer slides)
    and whether every layer slides. Read from the config: ``layer_types`` when it has them (Gemma-2/3, Qwen2/3),
    else ``sliding_window`` applies to every layer (Mistral, Phi-3)."""
    config = _text_config(model)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None, False
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        return int(window), True
    sliding = [kind == "sliding_attention" for kind in kinds]
    return (int(window), all(sliding)) if any(sliding) else (None, False)


def unsupported(model: Any, attention: str) -> str | None:
    """Why ``model``'s packed rows cannot be scored exactly with ``attention`` ("mask" or "varlen"), or None.

    What is known in advance: families whose mask ignores ``position_ids`` (``varlen``), ALiBi biases (computed
    from positions in the row), layer kinds other than full and sliding-window attention, a 4D mask with flash
    attention. ``Trainer`` also scores one micro-batch both ways before training (``agreement``), which catches
    what no rule here names."""
    base = base_model(model)
    name = type(base).__name__
    config = _text_config(model)
    if name in _REFUSED and attention in _REFUSED[name]:
        return _REFUSED[name][attention]
    if getattr(config, "alibi", False):
        return "its ALiBi position biases are computed over the whole row, across the packed sequences"
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        return f"it has layers of kind {sorted(kinds)}, which rpo_lib cannot mask per packed sequence"
    implementation = getattr(config, "_attn_implementation", None) or ""
    if attention == "mask" and "flash" in implementation:
        return (f"{implementation} takes no 4D mask; use packing_attention='varlen', which passes the sequence "
                "boundaries to it")
    return None


def attention_mask(model: Any, batch: PackedBatch, attention: Literal["mask", "varlen"], dtype: torch.dtype
                   ) -> Tensor | dict[str, Tensor] | None:
    """What ``model`` is given as ``attention_mask`` for packed rows.

    ``"varlen"``: None; transformers then reads the sequences from the restarting ``position_ids`` (its
    ``find_packed_sequence_indices``) and builds each layer's mask itself, sliding windows included, or hands
    the boundaries to flash attention. ``"mask"``: ``batch.block_causal_mask``, windowed where the model's
    layers slide: one mask when every layer slides (Mistral, Phi-3), else ``{"full_attention": ...,
    "sliding_attention": ...}``, the per-layer-kind form that Gemma-2/3 and Qwen2/3 accept."""
    if attention == "varlen":
        return None
    if attention != "mask":
        raise ValueError(f"attention must be 'mask' or 'varlen'; got {attention!r}.")
    window, every_layer = sliding_window_layers(model)
    full = batch.block_causal_mask(dtype=dtype)
    if window is None:
        return full
    windowed = batch.block_causal_mask(dtype=dtype, window=window)
    return windowed if every_layer else {"full_attention": full, "sliding_attention": windowed}


def _scored_logits(model: Any, batch: PackedBatch, keep: Tensor, mask: Any) -> Tensor:
    """The model's own logits at the ``keep`` positions, (P, V), in row-major order: its forward (through any DDP,
    FSDP or PEFT wrapper) with ``logits_to_keep`` a boolean (R, L) mask, so the output head runs on those positions
    only and whatever the model does to its logits (Gemma-2's soft-capping, Cohere's logit scale) is done."""
    logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                   use_cache=False, logits_to_keep=keep).logits
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # a model that returned every position
        logits = logits[keep]
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise ValueError(f"{type(base_model(model)).__name__} returned logits of shape {tuple(logits.shape)} for "
                         f"logits_to_keep of {int(keep.sum())} positions: it does not support packed scoring; "
                         "use padding_free=False.")
    return logits


def packed_token_logprobs(model: Any, batch: PackedBatch, *, attention: Literal["mask", "varlen"] = "mask",
                          chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """Score every packed sequence's completion tokens: ``(token_logps (N, C), mask (N, C))`` in input order.

    Row ``i`` holds sequence ``i``'s completion log-probs, left-aligned, ``C`` the longest completion; ``mask`` marks
    the real ones. This is the layout ``rpo_lib.logprobs.completion_logprobs`` returns for padded rows (there with
    the prompt positions masked out as well), so the losses take either.

    ``model`` is a Hugging Face causal LM, as the trainer holds it: bare, in a PEFT wrapper, in DDP or sharded by
    FSDP2. It runs its own forward once over the packed rows (``attention_mask`` as ``attention_mask()`` says)
    and projects only the positions whose next token is a completion token onto the vocabulary; the float32
    log-softmax of those (P, V) logits is taken in chunks of at most ``chunk_elements`` values
    (``rpo_lib.logprobs.token_logprobs``). ``unsupported(model, attention)`` says beforehand where this cannot be
    exact.
    """
    problem = unsupported(model, attention)
    if problem is not None:
        raise ValueError(f"{type(base_model(model)).__name__} cannot be scored padding-free with "
                         f"packing_attention={attention!r}: {problem}. Use padding_free=False.")
    device = batch.input_ids.device
    mask = attention_mask(model, batch, attention, compute_dtype(model))
    mask = {k: v.to(device) for k, v in mask.items()} if isinstance(mask, dict) else \
        mask.to(device) if mask is not None else None
    keep = torch.zeros_like(batch.completion_mask, dtype=torch.bool)
    keep[:, :-1] = batch.completion_mask[:, 1:].bool()  # position t predicts token t+1: targets that are completions
    rows, cols = torch.nonzero(keep, as_tuple=True)  # row-major: the order of the logits
    targets = batch.input_ids[rows, cols + 1]  # (P,)
    owner = batch.sequence_index[rows, cols + 1]  # (P,)
    logits = _scored_logits(model, batch, keep, mask)  # (P, V)
    values, _ = token_logprobs(logits[None], targets[None], torch.ones_like(targets[None]), shift=False,
                               chunk_elements=chunk_elements)
    values = values[0]
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
