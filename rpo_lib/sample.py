"""Batched sampling from a causal LM with a KV cache, returning rows ready for ``rpo_lib.logprobs``.

HyPO needs ``k`` fresh samples per prompt from the *current* policy at every step (math.md section 7), and
the evaluations need many samples; both go through ``sample``. Prompts are left-padded for generation
(with position ids from the attention mask, so padding does not move a token's position), each step feeds
only the newest token and reuses the cached keys and values, and finished rows stop at their EOS. The
result is repacked right-padded, ``prompt + completion + padding``, the layout the trainer and
``rpo_lib.logprobs.completion_logprobs`` use, with a completion mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rpo_lib.data import pad_rows

__all__ = ["Samples", "sample"]


@dataclass
class Samples:
    """``N = len(prompts) * k`` sampled rows, grouped by prompt: rows ``i*k ... i*k+k-1`` answer prompt ``i``.

    Attributes:
        input_ids, attention_mask, completion_mask: (N, T) right-padded prompt + completion rows.
        completion_ids: the N completions as token lists (with the EOS when one was produced).
        prompt_index: (N,) the prompt each row answers.
        finished: (N,) True where the completion ended with EOS (False: cut at ``max_new_tokens``).
        k: samples per prompt.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    completion_ids: list[list[int]]
    prompt_index: Tensor
    finished: Tensor
    k: int

    def batch(self) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask", "completion_mask"}``: what the trainer scores."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "completion_mask": self.completion_mask}

    def to(self, device: torch.device | str) -> Samples:
        return Samples(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                       self.completion_ids, self.prompt_index, self.finished, self.k)


def _next_token(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(N, V) last-position logits -> (N,) token ids (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
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
) -> Samples:
    """Sample ``k`` completions for each prompt.

    Args:
        model: a Hugging Face causal LM (a PEFT model too); its train/eval mode is restored afterwards.
        prompt_ids: token ids of each prompt (no padding), e.g. ``tokenizer(prompt)["input_ids"]``.
        k: samples per prompt (HyPO's RLOO needs k >= 2).
        max_new_tokens: longest completion; rows that reach it unfinished are kept (``finished`` False).
        temperature: softmax temperature; 0 samples greedily.
        eos_token_id, pad_token_id: from the tokenizer.
        generator: a ``torch.Generator`` for reproducible draws (the global RNG is used otherwise).
        use_cache: False recomputes the whole sequence at every step (slow; for testing the cache).
    """
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"k and max_new_tokens must be >= 1; got k={k}, max_new_tokens={max_new_tokens}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy); got {temperature}.")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (e.g. the BOS token).")
    device = next(model.parameters()).device
    rows = [list(p) for p in prompt_ids for _ in range(k)]
    n, width = len(rows), max(len(p) for p in rows)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(rows):  # left padding: every row's last prompt token sits in the last column
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        attention_mask[i, width - len(p):] = 1

    was_training = model.training
    model.eval()
    try:
        generated = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        cache = None
        step_ids, step_mask = input_ids, attention_mask
        for t in range(max_new_tokens):
            position_ids = (step_mask.cumsum(dim=1) - 1).clamp(min=0)
            if use_cache and cache is not None:
                out = model(input_ids=step_ids[:, -1:], attention_mask=step_mask,
                            position_ids=position_ids[:, -1:], past_key_values=cache, use_cache=True)
            else:
                out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=position_ids,
                            use_cache=use_cache)
            cache = out.past_key_values if use_cache else None
            token = _next_token(out.logits[:, -1, :], temperature, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            generated[:, t] = token
            lengths += (~finished).long()
            finished |= token == eos_token_id
            step_ids = torch.cat([step_ids, token[:, None]], dim=1)
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            if bool(finished.all()):
                break
    finally:
        model.train(was_training)

    completions = [generated[i, : int(lengths[i])].tolist() for i in range(n)]
    batch = pad_rows(rows, completions, pad_token_id)
    prompt_index = torch.arange(len(prompt_ids)).repeat_interleave(k)
    return Samples(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                   batch["completion_mask"].to(device), completions, prompt_index, finished.cpu(), k)
