"""Batched sampling from a causal LM with a KV cache, returning rows ready for ``rpo_lib.logprobs``.

HyPO needs ``k`` fresh samples per prompt from the *current* policy at every step (math.md section 7), and
the evaluations need many samples; both go through ``sample``. Prompts are left-padded for generation
(with position ids from the attention mask, so padding does not move a token's position), the prefill
keeps only the last position's logits, each step feeds only the newest token and reuses the cached keys
and values, and finished rows stop at their EOS. The result is repacked right-padded,
``prompt + completion + padding``, the layout the trainer and ``rpo_lib.logprobs.completion_logprobs`` use,
with a completion mask.

Everything stays on the model's device: pass a ``torch.Generator`` on that device (``torch.Generator(
device="cuda")``), or the probabilities are copied to the generator's device at every token. The host reads
the device once every ``_FINISHED_CHECK_EVERY`` tokens (have all rows finished?) and once at the end.

Memory: the KV cache grows with rows x tokens (``kv_cache_bytes``); ``max_rows`` splits the rows into
generation loops of at most that many (``rows_that_fit`` sizes it from a memory budget). The samples follow
the same distribution whatever ``max_rows`` is, but another ``max_rows`` gives other samples for the same seed.

Row seeds. ``row_seeds`` gives every row its own stream of random numbers: its ``max_new_tokens`` uniforms are
drawn up front from a generator seeded with the row's seed, and the token at step ``t`` is the inverse of the
softmax's cumulative distribution at the row's ``t``-th uniform (an exact draw from the softmax). A row's sample
then depends only on its prompt, its seed and the model, not on the rows beside it, on ``max_rows`` or on which
process draws it: that is how HyPO's online samples stay the same when a batch is split across processes
(``rpo_lib.train``, ``rpo_lib.parallel``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rpo_lib.data import pad_rows
from rpo_lib.models import compute_dtype

__all__ = ["Samples", "kv_cache_bytes", "row_seed", "rows_that_fit", "sample"]

_FINISHED_CHECK_EVERY = 8  # tokens between checks whether every row has finished (a host read each)


@dataclass
class Samples:
    """``N = len(prompts) * k`` sampled rows, grouped by prompt: rows ``i*k ... i*k+k-1`` answer prompt ``i``.

    Attributes:
        input_ids, attention_mask, completion_mask: (N, T) right-padded prompt + completion rows.
        completion_ids: the N completions as token lists (with the EOS when one was produced).
        prompt_index: (N,) the prompt each row answers.
        finished: (N,) True where the completion ended with EOS (False: cut at ``max_new_tokens``).
        k: samples per prompt.
        row_lengths: the N rows' prompt + completion lengths (known on the host, so slicing reads nothing back).
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    completion_ids: list[list[int]]
    prompt_index: Tensor
    finished: Tensor
    k: int
    row_lengths: list[int] = field(default_factory=list)

    def batch(self) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask", "completion_mask"}``: what the trainer scores."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "completion_mask": self.completion_mask}

    def to(self, device: torch.device | str) -> Samples:
        return Samples(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                       self.completion_ids, self.prompt_index, self.finished, self.k, self.row_lengths)

    def rows(self, start: int, stop: int) -> Samples:
        """The samples of prompts ``start ... stop-1`` (k rows each), trimmed to their own width."""
        first, last = start * self.k, stop * self.k
        lengths = self.row_lengths[first:last]
        width = max(lengths, default=0)
        return Samples(self.input_ids[first:last, :width], self.attention_mask[first:last, :width],
                       self.completion_mask[first:last, :width], self.completion_ids[first:last],
                       self.prompt_index[first:last] - start, self.finished[first:last], self.k, lengths)


def kv_cache_bytes(model: Any, rows: int, tokens: int) -> int:
    """Bytes of the KV cache for ``rows`` sequences of ``tokens`` tokens (prompt + completion).

    ``2 (K and V) x layers x key-value heads x head size x tokens x rows x bytes per value``, from the model's
    config and the dtype it computes in (``rpo_lib.models.compute_dtype``: a 4-bit model's compute dtype, bf16 for
    float32 master weights under autocast). For a
    Mistral-7B shape in bf16, 128 rows of 768 tokens take about 12.9 GB.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("kv_cache_bytes needs a Hugging Face model with a .config (num_hidden_layers, ...).")
    config = getattr(config, "text_config", None) or config
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if hasattr(model, "modules"):  # the dtype it computes (and caches) in: bf16 under autocast for float32 masters
        dtype = compute_dtype(model)
    else:  # a config without weights
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * tokens * rows * element


def rows_that_fit(model: Any, tokens: int, budget_bytes: float) -> int:
    """How many sequences of ``tokens`` tokens fit in ``budget_bytes`` of KV cache (at least 1)."""
    return max(1, int(budget_bytes // max(1, kv_cache_bytes(model, 1, tokens))))


def row_seed(*parts: int) -> int:
    """A 63-bit seed mixed from whole numbers (e.g. run seed, step, example index, sample number): distinct
    tuples give unrelated streams (numpy's ``SeedSequence`` hashing)."""
    import numpy as np

    high, low = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & ((1 << 63) - 1)


def _row_uniforms(seeds: Sequence[int], steps: int) -> Tensor:
    """(N, steps) uniforms in [0, 1): row i's from its own generator seeded with ``seeds[i]``."""
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds])


def _next_token(logits: Tensor, temperature: float, generator: torch.Generator | None,
                uniforms: Tensor | None = None) -> Tensor:
    """(N, V) last-position logits -> (N,) token ids (greedy at temperature 0). With ``uniforms`` (N,), row i's
    token is the inverse of its cumulative distribution at ``uniforms[i]``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if uniforms is not None:
        cdf = probs.double().cumsum(dim=-1)
        target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # scaled by the total: rounding leaves <= 1
        return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # slow on a GPU: pass a generator on the model's device
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def _generate(model: Any, rows: list[list[int]], *, max_new_tokens: int, temperature: float, eos_token_id: int,
              pad_token_id: int, generator: torch.Generator | None, use_cache: bool,
              device: torch.device, uniforms: Tensor | None = None,
              all_finished: Callable[[Tensor], bool] | None = None) -> tuple[list[list[int]], list[bool]]:
    """One generation loop over ``rows`` (prompt token lists); returns completions and finished flags."""
    all_finished = all_finished or (lambda flags: bool(flags.all()))
    n, width = len(rows), max(len(p) for p in rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(rows):  # left padding: every row's last prompt token sits in the last column
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    step_ids, step_mask = input_ids.to(device), attention_mask.to(device)
    generated = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    cache = None
    for t in range(max_new_tokens):
        position_ids = (step_mask.cumsum(dim=1) - 1).clamp(min=0)
        if use_cache and cache is not None:
            out = model(input_ids=step_ids[:, -1:], attention_mask=step_mask, position_ids=position_ids[:, -1:],
                        past_key_values=cache, use_cache=True)
        else:  # the prefill (or every step without a cache): only the last position's logits are needed
            out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=position_ids,
                        use_cache=use_cache, logits_to_keep=1)
        cache = out.past_key_values if use_cache else None
        token = _next_token(out.logits[:, -1, :], temperature, generator,
                            uniforms[:, t] if uniforms is not None else None)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        generated[:, t] = token
        lengths += (~finished).long()
        finished |= token == eos_token_id
        step_ids = torch.cat([step_ids, token[:, None]], dim=1)
        step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
        if (t + 1) % _FINISHED_CHECK_EVERY == 0 and all_finished(finished):
            break
    table = torch.cat([generated, lengths[:, None], finished.long()[:, None]], dim=1).tolist()  # one read-back
    return [row[:row[-2]] for row in table], [bool(row[-1]) for row in table]


def sample(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    k: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    max_rows: int | None = None,
    row_seeds: Sequence[int] | None = None,
    all_finished: Callable[[Tensor], bool] | None = None,
) -> Samples:
    """Sample ``k`` completions for each prompt.

    Args:
        model: a Hugging Face causal LM (a PEFT model too); its train/eval mode is restored afterwards.
        prompt_ids: token ids of each prompt (no padding), e.g. ``tokenizer(prompt)["input_ids"]``.
        k: samples per prompt (HyPO's RLOO needs k >= 2).
        max_new_tokens: longest completion; rows that reach it unfinished are kept (``finished`` False).
        temperature: softmax temperature; 0 samples greedily.
        eos_token_id, pad_token_id: from the tokenizer.
        generator: a ``torch.Generator`` for reproducible draws, best on the model's device (the global RNG
            is used otherwise).
        use_cache: False recomputes the whole sequence at every step (slow; for testing the cache).
        max_rows: at most this many rows (prompts x k) per generation loop, to bound the KV cache's memory
            (``rows_that_fit``); None: all rows in one loop.
        row_seeds: one seed per row (``len(prompt_ids) * k``, prompt-major): each row draws from its own stream
            (see the module docstring), so its sample does not depend on the other rows; ``generator`` is unused.
        all_finished: ``all_finished(finished) -> bool``, asked every few tokens whether to stop. Processes that
            run a sharded model (FSDP) must take the same number of steps: ``rpo_lib.parallel`` passes a check
            that agrees across processes. Default: every row of this loop has finished.
    """
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"k and max_new_tokens must be >= 1; got k={k}, max_new_tokens={max_new_tokens}.")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy); got {temperature}.")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for one loop); got {max_rows}.")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (e.g. the BOS token).")
    device = next(model.parameters()).device
    rows = [list(p) for p in prompt_ids for _ in range(k)]
    if row_seeds is not None and len(row_seeds) != len(rows):
        raise ValueError(f"row_seeds needs one seed per row (prompts x k = {len(rows)}); got {len(row_seeds)}.")
    uniforms = _row_uniforms(row_seeds, max_new_tokens) if row_seeds is not None else None
    chunk = len(rows) if max_rows is None else max_rows
    completions: list[list[int]] = []
    finished: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), chunk):
            done, flags = _generate(model, rows[start:start + chunk], max_new_tokens=max_new_tokens,
                                    temperature=temperature, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                    generator=generator, use_cache=use_cache, device=device,
                                    uniforms=uniforms[start:start + chunk] if uniforms is not None else None,
                                    all_finished=all_finished)
            completions += done
            finished += flags
    finally:
        model.train(was_training)

    batch = pad_rows(rows, completions, pad_token_id)
    prompt_index = torch.arange(len(prompt_ids)).repeat_interleave(k)
    return Samples(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                   batch["completion_mask"].to(device), completions, prompt_index, torch.tensor(finished), k,
                   [len(p) + len(c) for p, c in zip(rows, completions, strict=True)])
