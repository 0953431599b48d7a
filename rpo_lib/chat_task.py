"""A real chat model's own replies, labelled by a rule a program can check: the pairs of notebook 08's CPU mode.

The rule (``gold_score``): **a reply that ends its turn within the token budget beats one that is cut off; between
two of the same kind, the one with fewer words wins.** It stands in for a human preference because it can be
checked exactly, so that an evaluation measures the true ("gold") score of new samples instead of asking a reward
model; and because SmolLM2-135M-Instruct's own samples vary in it a lot, so a few dozen pairs carry a signal a
LoRA adapter can learn on a CPU. It is not helpfulness: a curt or empty reply scores well (a rule can be gamed,
which is what notebook 08 says about it).

``data/chat_pairs/smollm2_brevity.jsonl`` is made by ``python scripts/make_chat_pairs.py --write`` with
``make_pairs``: for each prompt of ``data/chat_pairs/prompts.txt``, ``samples_per_prompt`` replies sampled from
SmolLM2-135M-Instruct (``rpo_lib.models.smollm2``) at ``temperature``; the best reply under the rule is chosen, the
worst rejected, among the replies that ended their turn (a cut-off reply would end with the template's end of turn
once it is a training row, and look finished); prompts with fewer than two finished replies of different lengths
are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHAT_PAIRS_DIR", "CUT_OFF_PENALTY", "PairSettings", "gold_score", "load_chat_pairs", "load_prompts",
           "make_pairs", "words"]

CHAT_PAIRS_DIR = Path(__file__).resolve().parents[1] / "data" / "chat_pairs"
CUT_OFF_PENALTY = 100.0  # a cut-off reply scores below any finished one of fewer than 100 words


def words(text: str) -> int:
    """The number of whitespace-separated words of ``text``."""
    return len(text.split())


def gold_score(reply: str, finished: bool) -> float:
    """The rule as a number (higher is better): ``-words(reply)``, minus ``CUT_OFF_PENALTY`` if the reply did not end
    its turn within the budget (``finished`` False)."""
    return -float(words(reply)) - (0.0 if finished else CUT_OFF_PENALTY)


@dataclass(frozen=True)
class PairSettings:
    """How the pairs were sampled (written into each row, so the file says how it was made)."""

    samples_per_prompt: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.7
    seed: int = 0


def load_prompts(path: str | Path | None = None) -> list[str]:
    """The user prompts, one per line (``data/chat_pairs/prompts.txt``: written by us for this task)."""
    lines = Path(path or CHAT_PAIRS_DIR / "prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def load_chat_pairs(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The shipped pairs, as conversational preference rows ``{"prompt", "chosen", "rejected", ...}``."""
    text = Path(path or CHAT_PAIRS_DIR / "smollm2_brevity.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def make_pairs(model: Any, tokenizer: Any, prompts: Sequence[str], settings: PairSettings = PairSettings(), *,
               batch_prompts: int = 16) -> list[dict[str, Any]]:
    """Sample ``settings.samples_per_prompt`` replies per prompt from ``model`` (through its chat template) and keep
    the best and the worst under ``gold_score`` as a pair. Row ``j`` of prompt ``i`` draws from its own seed, so
    a prompt's replies do not depend on the batch around it (``rpo_lib.sample``)."""
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    from rpo_lib.sample import row_seed, sample

    k = settings.samples_per_prompt
    rows = []
    for start in tqdm(range(0, len(prompts), batch_prompts), desc="sampling replies"):
        chunk = list(prompts[start:start + batch_prompts])
        messages = [[{"role": "user", "content": p}] for p in chunk]
        prompt_ids = [list(tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True,
                                                         return_dict=True)["input_ids"]) for m in messages]
        seeds = [row_seed(settings.seed, start + i, j) for i in range(len(chunk)) for j in range(k)]
        with torch.no_grad():
            out = sample(model, prompt_ids, k=k, max_new_tokens=settings.max_new_tokens,
                         temperature=settings.temperature, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, row_seeds=seeds)
        for i, prompt in enumerate(messages):
            replies = []
            for j in range(i * k, (i + 1) * k):
                text = tokenizer.decode(out.completion_ids[j], skip_special_tokens=True).strip()
                finished = bool(out.finished[j])
                replies.append((gold_score(text, finished), text, finished))
            done = [r for r in replies if r[2] and r[1]]
            if len(done) < 2:
                continue
            best, worst = max(done, key=lambda r: r[0]), min(done, key=lambda r: r[0])
            if best[0] == worst[0]:
                continue
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": best[1]}],
                         "rejected": [{"role": "assistant", "content": worst[1]}],
                         "gold_chosen": best[0], "gold_rejected": worst[0],
                         "sampling": settings.__dict__})
    return rows
