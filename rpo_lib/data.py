"""Text rows -> checked, tokenized examples -> padded batches, with every dropped row counted.

Rows are dicts (a list of dicts, or a ``datasets.Dataset``, which iterates as dicts):

- SFT rows: ``{"prompt": str, "completion": str}``
- preference rows: ``{"prompt": str, "chosen": str, "rejected": str}``

Text is plain: apply a chat template *before* (``tokenizer.apply_chat_template(..., tokenize=False)``) if
your model needs one. Tokenization follows TRL 1.x so that the two give the same tokens: the prompt and
``prompt + completion`` are tokenized separately, the completion starts where the two first differ (a merge
across the boundary is handled), and the end-of-sequence token is appended to every completion.

What happens to bad rows (nothing is lost silently; ``DataReport`` says what was dropped and why):

========================================= ================================================================
row                                       outcome
========================================= ================================================================
a field missing, or not a string          ``ValueError`` naming the row and the field (fix the data)
empty (or whitespace-only) completion     dropped, counted as ``"empty completion"``
chosen identical to rejected              dropped, counted as ``"chosen identical to rejected"``
prompt leaves no room for a completion    dropped, counted as ``"prompt too long"``
completion longer than the room left      cut to ``max_length`` (its EOS is lost), counted as truncated
every row dropped                         ``ValueError`` with the counts
========================================= ================================================================
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataReport", "PreferenceExample", "SFTExample", "collate_preferences", "collate_sft", "fingerprint",
           "pad_rows", "tokenize_preferences", "tokenize_sft"]

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
SFT_FIELDS = ("prompt", "completion")


@dataclass
class DataReport:
    """What became of the rows: kept, dropped (by reason) and truncated. ``str(report)`` is one sentence."""

    rows_in: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    what: str = "rows"

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        text = f"kept {self.kept} of {self.rows_in} {self.what}"
        reasons = [f"{count} ({reason})" for reason, count in self.dropped.items() if count]
        if reasons:
            text += "; dropped " + ", ".join(reasons)
        if self.truncated:
            text += f"; {self.truncated} truncated to max_length"
        return text + "."


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass(frozen=True)
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _check_row(row: Any, index: int, fields: Sequence[str]) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index} is a {type(row).__name__}, not a dict with fields {', '.join(fields)}.")
    for name in fields:
        if name not in row or row[name] is None:
            have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
            raise ValueError(
                f"row {index} has no {name!r} field (it has: {have}). Every row needs {', '.join(fields)}: "
                f"fill it in or filter such rows out before training."
            )
        if not isinstance(row[name], str):
            raise ValueError(
                f"row {index} field {name!r} is a {type(row[name]).__name__}; expected text. Conversational "
                f"rows (lists of messages) must be rendered first, e.g. with tokenizer.apply_chat_template(..., "
                f"tokenize=False)."
            )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _split(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS), the completion starting where the two tokenizations differ."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    full_ids = list(tokenizer(prompt + completion)["input_ids"])
    cut = _common_prefix(prompt_ids, full_ids)
    return prompt_ids[:cut], full_ids[cut:] + [tokenizer.eos_token_id]


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token so that completions can end.")


def _room(prompt_ids: list[int], max_length: int, max_prompt_length: int | None) -> int:
    """Completion tokens that fit after the prompt (<= 0: the prompt is too long)."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        return 0
    return max_length - len(prompt_ids)


def _tokenize_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, completion_fields: tuple[str, ...], *,
                   max_length: int, max_prompt_length: int | None, what: str
                   ) -> tuple[list[tuple[list[int], list[list[int]]]], DataReport]:
    """The rules of the module docstring for rows with one (SFT) or two (preference) completions.

    Returns ``[(prompt_ids, [completion_ids, ...])]`` and the report.
    """
    _check_tokenizer(tokenizer)
    paired = len(completion_fields) == 2
    kept: list[tuple[list[int], list[list[int]]]] = []
    dropped = {"empty completion": 0, **({"chosen identical to rejected": 0} if paired else {}), "prompt too long": 0}
    truncated = n = 0
    for n, row in enumerate(rows, start=1):
        _check_row(row, n - 1, ("prompt", *completion_fields))  # prompt first: errors name it first
        texts = [row[name] for name in completion_fields]
        if not all(text.strip() for text in texts):
            dropped["empty completion"] += 1
            continue
        if paired and texts[0] == texts[1]:
            dropped["chosen identical to rejected"] += 1
            continue
        splits = [_split(tokenizer, row["prompt"], text) for text in texts]
        # A merge across the boundary can differ between completions: keep the prompt they share.
        cut = min(_common_prefix(splits[0][0], prompt_ids) for prompt_ids, _ in splits)
        prompt_ids = splits[0][0][:cut]
        completions = [prompt[cut:] + completion for prompt, completion in splits]
        room = _room(prompt_ids, max_length, max_prompt_length)
        if room <= 0:
            dropped["prompt too long"] += 1
            continue
        if any(len(ids) > room for ids in completions):
            completions = [ids[:room] for ids in completions]
            if paired and completions[0] == completions[1]:
                dropped["chosen identical to rejected"] += 1
                continue
            truncated += 1
        kept.append((prompt_ids, completions))
    report = DataReport(rows_in=n, kept=len(kept), dropped=dropped, truncated=truncated, what=what)
    if not kept:
        kind = "preference rows" if paired else "SFT rows"
        raise ValueError(f"no usable {kind}: {report} Check max_length and the data.")
    return kept, report


def tokenize_preferences(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[list[PreferenceExample], DataReport]:
    """Check and tokenize preference rows (see the module docstring for what happens to bad ones)."""
    kept, report = _tokenize_rows(rows, tokenizer, PREFERENCE_FIELDS[1:], max_length=max_length,
                                  max_prompt_length=max_prompt_length, what="pairs")
    return [PreferenceExample(prompt, chosen, rejected) for prompt, (chosen, rejected) in kept], report


def tokenize_sft(
    rows: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[list[SFTExample], DataReport]:
    """Check and tokenize SFT rows ``{"prompt", "completion"}`` (same rules as for preferences)."""
    kept, report = _tokenize_rows(rows, tokenizer, SFT_FIELDS[1:], max_length=max_length,
                                  max_prompt_length=max_prompt_length, what="rows")
    return [SFTExample(prompt, completion) for prompt, (completion,) in kept], report


def pad_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded ``prompt + completion`` rows: input_ids, attention_mask, completion_mask, each (N, T)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        length = len(p) + len(c)
        input_ids[i, :length] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, :length] = 1
        completion_mask[i, len(p):length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_preferences(examples: Sequence[PreferenceExample], pad_token_id: int) -> dict[str, Tensor]:
    """One batch of 2B rows: the B chosen rows first, then the B rejected rows (one forward pass for both)."""
    prompts = [e.prompt_ids for e in examples] * 2
    completions = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    return pad_rows(prompts, completions, pad_token_id)


def collate_sft(examples: Sequence[SFTExample], pad_token_id: int) -> dict[str, Tensor]:
    """One batch of B prompt + completion rows."""
    return pad_rows([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_token_id)


def fingerprint(examples: Sequence[SFTExample | PreferenceExample]) -> str:
    """SHA-256 of the tokenized examples, in order: equal exactly when the token ids are (a checkpoint records
    it, so that a resumed run can tell that it is given the same data)."""
    digest = hashlib.sha256()
    for example in examples:
        for ids in (getattr(example, f.name) for f in fields(example)):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()
