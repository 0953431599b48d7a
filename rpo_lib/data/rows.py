"""Rows -> checked, tokenized examples -> padded batches, with every dropped row counted.

Rows are dicts (a list of dicts, or a ``datasets.Dataset``, which iterates as dicts), in TRL's formats:

================== ============================================= ==============================================
kind               text rows                                     conversational rows (lists of messages)
================== ============================================= ==============================================
SFT                ``{"prompt": str, "completion": str}``        ``{"messages": [...]}`` (the last message, the
                                                                 assistant's, is the completion), or
                                                                 ``{"prompt": [...], "completion": [...]}``
preference         ``{"prompt": str, "chosen": str,              ``{"prompt": [...], "chosen": [...],
                   "rejected": str}``                            "rejected": [...]}``
implicit prompt    ``{"chosen": str, "rejected": str}``: the     ``{"chosen": [...], "rejected": [...]}``: the
                   prompt is their common beginning              prompt is their common first messages
================== ============================================= ==============================================

A message is ``{"role": ..., "content": str}``. Conversational rows are rendered by the tokenizer's chat
template, as TRL 1.x does: the prompt with ``add_generation_prompt=True``, the prompt and completion as one
conversation, both tokenized by ``apply_chat_template`` (so the template's own BOS is the only one), and the
completion ends with the template's end of turn (no EOS is added). Text rows are tokenized with the
tokenizer's special tokens, and the EOS token is appended to each completion unless it already ends with one;
a text that already starts with the BOS token (a chat template rendered to text) keeps a single BOS.

Tokenization follows TRL so that the two give the same tokens: the prompt and ``prompt + completion`` are
tokenized separately and the completion starts where the two first differ (a merge across the boundary, or a
template that renders the prompt differently, is handled). The completion's first token is always scored: an
empty prompt becomes the BOS token; a tokenizer without a BOS token and an empty prompt is an error.

What happens to bad rows (nothing is lost silently; ``DataReport`` says what was dropped and why):

========================================= ================================================================
row                                       outcome
========================================= ================================================================
a field missing, or of the wrong kind     ``ValueError`` naming the row and the field (fix the data)
text and messages mixed in one row        ``ValueError`` naming the row
an empty prompt, tokenizer without BOS    ``ValueError`` naming the row (give a prompt, or a bos_token)
empty (or whitespace-only) completion     dropped, counted as ``"empty completion"``
chosen identical to rejected              dropped, counted as ``"chosen identical to rejected"``
prompt longer than ``max_prompt_length``  ``prompt_truncation="keep_end"`` (default): its last tokens kept (and
                                          its first token if that is BOS), counted as ``prompts_truncated``;
                                          ``"drop"``: dropped, counted as ``"prompt too long"``
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
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["PREFERENCE_FIELDS", "SFT_FIELDS", "DataReport", "PreferenceExample", "PromptTruncation", "SFTExample",
           "check_tokenizer", "collate_preferences", "collate_sft", "fingerprint", "new_report", "pad_rows",
           "tokenize_preferences", "tokenize_row", "tokenize_sft"]

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
    prompts_truncated: int = 0

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
        if self.prompts_truncated:
            text += f"; {self.prompts_truncated} prompts cut to max_prompt_length (their end kept)"
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


Chat = list  # a conversation: a list of {"role", "content"} messages


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _check_messages(messages: Any, index: int, name: str) -> None:
    if not _is_chat(messages):
        raise ValueError(f"row {index} field {name!r} is a {type(messages).__name__}; expected text or a non-empty "
                         f"list of messages {{'role': ..., 'content': ...}}.")
    for position, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"row {index} field {name!r}: message {position} needs a 'role' and a text 'content'; "
                             f"it has {sorted(message)}.")


def _missing(row: Mapping[str, Any], index: int, name: str, needed: str) -> ValueError:
    have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
    return ValueError(f"row {index} has no {name!r} field (it has: {have}). Every row needs {needed}: fill it in or "
                      f"filter such rows out before training.")


def _split_implicit(chosen: Any, rejected: Any, index: int) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full texts or conversations that share their beginning (TRL's
    ``extract_prompt``): the longest common prefix of characters (a space before the split goes to the
    completions) or of messages."""
    n = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and 0 < n and chosen[n - 1] == " ":
        n -= 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise ValueError(f"row {index} has no 'prompt', and its chosen and rejected responses do not share a "
                         f"beginning that leaves both a completion: add a 'prompt' field.")
    return chosen[:n], chosen[n:], rejected[n:]


def _row_parts(row: Any, index: int, completion_fields: tuple[str, ...]) -> tuple[Any, list[Any]]:
    """(prompt, completions) of a row in any supported format: all text, or all conversations."""
    needed = ", ".join(("prompt", *completion_fields))
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index} is a {type(row).__name__}, not a dict with fields {needed}.")
    if completion_fields == ("completion",) and row.get("messages") is not None and row.get("prompt") is None:
        messages = row["messages"]
        _check_messages(messages, index, "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError(f"row {index}: 'messages' must end with the assistant's message (the completion) after "
                             f"at least one other message; it ends with a {messages[-1]['role']!r} message.")
        return messages[:-1], [messages[-1:]]
    for name in completion_fields:
        if row.get(name) is None:
            if row.get("prompt") is None and row.get(completion_fields[0]) is None:
                raise _missing(row, index, "prompt", needed)
            raise _missing(row, index, name, needed)
    completions = [row[name] for name in completion_fields]
    prompt = row.get("prompt")
    if prompt is None:
        if len(completion_fields) == 1:
            raise _missing(row, index, "prompt", needed)
        prompt, *completions = _split_implicit(completions[0], completions[1], index)
    values = {"prompt": prompt, **dict(zip(completion_fields, completions, strict=True))}
    chat = [name for name, value in values.items() if not isinstance(value, str)]
    if chat and len(chat) < len(values):
        texts = [name for name in values if name not in chat]
        raise ValueError(f"row {index} mixes text ({', '.join(texts)}) and messages ({', '.join(chat)}): give every "
                         f"field as text, or every field as a list of messages.")
    for name in chat:
        _check_messages(values[name], index, name)
    return prompt, completions


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text)``'s ids; a text that already starts with the BOS token keeps one BOS, not two."""
    ids = list(tokenizer(text)["input_ids"])
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is not None and bos_text and text.startswith(bos_text) and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def _encode_chat(tokenizer: Any, messages: Chat, *, generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational rows need a tokenizer with a chat template (tokenizer.chat_template is "
                         "empty): set one, or give the rows as text.")
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=True)
    return list(encoded["input_ids"])


def _split(tokenizer: Any, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + completion ids): text through the tokenizer, conversations through the template."""
    if isinstance(prompt, str):
        return _encode_text(tokenizer, prompt), _encode_text(tokenizer, prompt + completion)
    return (_encode_chat(tokenizer, prompt, generation_prompt=True),
            _encode_chat(tokenizer, prompt + completion, generation_prompt=False))


def check_tokenizer(tokenizer: Any) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token so that completions can end.")


def _is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return not any(message["content"].strip() for message in completion)


PromptTruncation = Literal["keep_end", "drop"]
KEPT, TRUNCATED, PROMPT_TRUNCATED = "kept", "truncated", "prompt truncated"


def tokenize_row(row: Mapping[str, Any], index: int, tokenizer: Any, completion_fields: tuple[str, ...], *,
                 max_length: int, max_prompt_length: int | None,
                 prompt_truncation: PromptTruncation = "keep_end") -> tuple[str, list[int], list[list[int]]]:
    """The rules of the module docstring for one row: ``(outcome, prompt_ids, [completion_ids, ...])``.

    ``outcome`` is ``"kept"``, ``"truncated"`` (a completion was cut), ``"prompt truncated"`` or a reason for
    dropping the row (a key of ``DataReport.dropped``; the ids are then empty). ``tokenize_preferences`` and
    ``rpo_lib.data.sources.tokenize_dataset`` (through ``datasets.map``) both call it."""
    paired = len(completion_fields) == 2
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    prompt, texts = _row_parts(row, index, completion_fields)
    if any(_is_empty(text) for text in texts):
        return "empty completion", [], []
    if paired and texts[0] == texts[1]:
        return "chosen identical to rejected", [], []
    splits = [_split(tokenizer, prompt, text) for text in texts]
    # The completion starts where prompt and prompt + completion first differ; the prompt kept is the part every
    # completion shares (a merge across the boundary can differ between completions).
    cut = min(_common_prefix(prompt_ids, full_ids) for prompt_ids, full_ids in splits)
    prompt_ids = splits[0][0][:cut]
    completions = [full_ids[cut:] for _, full_ids in splits]
    if not prompt_ids:  # nothing before the completion: its first token would never be scored
        if bos is None:
            raise ValueError(f"row {index} has an empty prompt and the tokenizer has no BOS token, so the "
                             f"completion's first token could not be scored: give the row a prompt, or set "
                             f"tokenizer.bos_token (GPT-2-style models use the EOS token).")
        prompt_ids = [bos]
    if isinstance(prompt, str):  # text rows end with EOS (once); a template ends its turns itself
        completions = [ids if ids and ids[-1] == eos else ids + [eos] for ids in completions]
    outcome = KEPT
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        if prompt_truncation == "drop":
            return "prompt too long", [], []
        head = prompt_ids[:1] if bos is not None and prompt_ids[0] == bos else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)):]
        outcome = PROMPT_TRUNCATED
    room = max_length - len(prompt_ids)
    if room <= 0:
        return "prompt too long", [], []
    if any(len(ids) > room for ids in completions):
        completions = [ids[:room] for ids in completions]
        if paired and completions[0] == completions[1]:
            return "chosen identical to rejected", [], []
        outcome = TRUNCATED if outcome == KEPT else outcome + "+" + TRUNCATED
    return outcome, prompt_ids, completions


def new_report(rows_in: int, completion_fields: tuple[str, ...], outcomes: Iterable[str], what: str) -> DataReport:
    """Count the outcomes of ``tokenize_row`` into a ``DataReport``."""
    paired = len(completion_fields) == 2
    dropped = {"empty completion": 0, **({"chosen identical to rejected": 0} if paired else {}), "prompt too long": 0}
    kept = truncated = prompts_truncated = 0
    for outcome in outcomes:
        if outcome in dropped:
            dropped[outcome] += 1
            continue
        kept += 1
        truncated += TRUNCATED in outcome
        prompts_truncated += PROMPT_TRUNCATED in outcome
    return DataReport(rows_in=rows_in, kept=kept, dropped=dropped, truncated=truncated, what=what,
                      prompts_truncated=prompts_truncated)


def _tokenize_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, completion_fields: tuple[str, ...], *,
                   max_length: int, max_prompt_length: int | None, what: str,
                   prompt_truncation: PromptTruncation = "keep_end"
                   ) -> tuple[list[tuple[list[int], list[list[int]]]], DataReport]:
    """``tokenize_row`` over every row: ``[(prompt_ids, [completion_ids, ...])]`` of the kept ones, and the report."""
    check_tokenizer(tokenizer)
    kept: list[tuple[list[int], list[list[int]]]] = []
    outcomes = []
    for index, row in enumerate(rows):
        outcome, prompt_ids, completions = tokenize_row(row, index, tokenizer, completion_fields,
                                                        max_length=max_length, max_prompt_length=max_prompt_length,
                                                        prompt_truncation=prompt_truncation)
        outcomes.append(outcome)
        if prompt_ids:
            kept.append((prompt_ids, completions))
    report = new_report(len(outcomes), completion_fields, outcomes, what)
    if not kept:
        kind = "preference rows" if len(completion_fields) == 2 else "SFT rows"
        raise ValueError(f"no usable {kind}: {report} Check max_length and the data.")
    return kept, report


def _examples(rows: Any, tokenizer: Any, names: tuple[str, ...], kind: type, what: str, *, max_length: int,
              max_prompt_length: int | None, prompt_truncation: PromptTruncation) -> tuple[list[Any], DataReport]:
    """``kind(prompt_ids, *completion_ids)`` for every kept row, and the report. A dataset that
    ``rpo_lib.data.tokenize_dataset`` made (columns ``<field>_ids``) is taken as it is."""
    columns = getattr(rows, "column_names", None)
    if columns and all(f"{name}_ids" in columns for name in names):
        data = rows.select_columns([f"{name}_ids" for name in names]).with_format(None)
        examples = [kind(*(list(row[f"{name}_ids"]) for name in names)) for row in data]
        return examples, DataReport(rows_in=len(examples), kept=len(examples), what=what)
    kept, report = _tokenize_rows(rows, tokenizer, names[1:], max_length=max_length,
                                  max_prompt_length=max_prompt_length, what=what, prompt_truncation=prompt_truncation)
    return [kind(prompt, *completions) for prompt, completions in kept], report


def tokenize_preferences(rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                         max_prompt_length: int | None = None, prompt_truncation: PromptTruncation = "keep_end",
                         ) -> tuple[list[PreferenceExample], DataReport]:
    """Check and tokenize preference rows (see the module docstring for what happens to bad ones)."""
    return _examples(rows, tokenizer, PREFERENCE_FIELDS, PreferenceExample, "pairs", max_length=max_length,
                     max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation)


def tokenize_sft(rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                 max_prompt_length: int | None = None, prompt_truncation: PromptTruncation = "keep_end",
                 ) -> tuple[list[SFTExample], DataReport]:
    """Check and tokenize SFT rows ``{"prompt", "completion"}`` (same rules as for preferences)."""
    return _examples(rows, tokenizer, SFT_FIELDS, SFTExample, "rows", max_length=max_length,
                     max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation)


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
