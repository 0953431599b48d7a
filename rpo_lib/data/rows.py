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
import warnings
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["PREFERENCE_FIELDS", "SFT_FIELDS", "DataReport", "PreferenceExample", "PromptTruncation", "SFTExample",
           "check_tokenizer", "collate_preferences", "collate_sft", "fingerprint", "new_report", "pad_rows",
           "special_strings", "start_tokens", "text_rows_for_chat_model", "tokenize_preferences", "tokenize_row",
           "tokenize_sft"]

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
    completions_cut: int = 0  # completions (not rows) cut to max_length: each lost its end of turn / EOS
    completions: int = 0  # completions kept in all (2 per pair, 1 per SFT row)
    special_text: int = 0  # kept rows whose text holds a special token's string (e.g. a typed "<|im_end|>")
    parse_special_tokens: bool = True  # how those strings were tokenized: as special tokens, or as plain text
    text_rows_for_chat_model: bool = False  # text rows given to a tokenizer with a chat template

    @property
    def cut_share(self) -> float:
        """The share of kept completions cut to ``max_length`` (each lost its end-of-turn or EOS token)."""
        return self.completions_cut / self.completions if self.completions else 0.0

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def __str__(self) -> str:
        text = f"kept {self.kept} of {self.rows_in} {self.what}"
        reasons = [f"{count} ({reason})" for reason, count in self.dropped.items() if count]
        if reasons:
            text += "; dropped " + ", ".join(reasons)
        if self.truncated:
            text += (f"; {self.truncated} truncated to max_length ({self.completions_cut} of {self.completions} "
                     f"completions cut, {self.cut_share:.0%}, each losing its end of turn)")
        if self.prompts_truncated:
            text += f"; {self.prompts_truncated} prompts cut to max_prompt_length (their end kept)"
        if self.special_text:
            how = ("read as special tokens (parse_special_tokens=False reads them as text)"
                   if self.parse_special_tokens else "read as plain text")
            text += f"; {self.special_text} with a special token's text in them, {how}"
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


def _encode_text(tokenizer: Any, text: str, *, plain: bool = False) -> list[int]:
    """``tokenizer(text)``'s ids; a text that already starts with the BOS token keeps one BOS, not two. ``plain``:
    special tokens' strings in the text are read as plain text."""
    ids = list(tokenizer(text, split_special_tokens=True)["input_ids"] if plain else tokenizer(text)["input_ids"])
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is not None and bos_text and text.startswith(bos_text) and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def _encode_chat(tokenizer: Any, messages: Chat, *, generation_prompt: bool, plain: bool = False) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational rows need a tokenizer with a chat template (tokenizer.chat_template is "
                         "empty): set one, or give the rows as text.")
    if plain:  # the template's own markers stay special; the messages' text is read as plain text
        return _encode_chat_plain(tokenizer, messages, generation_prompt=generation_prompt)
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                            return_dict=True)
    return list(encoded["input_ids"])


def _encode_chat_plain(tokenizer: Any, messages: Chat, *, generation_prompt: bool) -> list[int]:
    """The rendered conversation tokenized in pieces: the template's text as usual, each message's content with its
    special tokens' strings read as plain text (only for rows that hold such strings: pieces can merge differently
    at their seams than a whole text does)."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids: list[int] = []
    position = 0
    for message in messages:
        at = rendered.find(message["content"], position) if message["content"] else -1
        if at < 0:
            continue
        ids += tokenizer(rendered[position:at], add_special_tokens=False)["input_ids"]
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        position = at + len(message["content"])
    return ids + list(tokenizer(rendered[position:], add_special_tokens=False)["input_ids"])


def _split(tokenizer: Any, prompt: Any, completion: Any, plain: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + completion ids): text through the tokenizer, conversations through the template."""
    if isinstance(prompt, str):
        return (_encode_text(tokenizer, prompt, plain=plain),
                _encode_text(tokenizer, prompt + completion, plain=plain))
    return (_encode_chat(tokenizer, prompt, generation_prompt=True, plain=plain),
            _encode_chat(tokenizer, prompt + completion, generation_prompt=False, plain=plain))


def start_tokens(tokenizer: Any) -> list[int]:
    """What the tokenizer writes before any text: its BOS when it adds one (Llama, Mistral, Gemma), else nothing
    (GPT-2, Qwen, SmolLM2). What counts as a BOS is what the tokenizer or the template adds, not ``bos_token``:
    ChatML tokenizers name ``<|im_start|>``, which opens every turn, as their ``bos_token``."""
    return list(tokenizer("")["input_ids"])


def _bos_opens_turns(tokenizer: Any) -> bool:
    """Whether the tokenizer's ``bos_token`` is a turn marker of its chat template (ChatML's ``<|im_start|>``)."""
    template, bos_text = getattr(tokenizer, "chat_template", None), tokenizer.bos_token
    return bool(template and bos_text and isinstance(template, str) and bos_text in template)


def special_strings(tokenizer: Any) -> list[str]:
    """The strings of the tokenizer's special tokens (what a text must not contain to be read as written)."""
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return sorted(s for s in specials if s)


def _texts(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [message["content"] for message in value]


def _truncate_chat(tokenizer: Any, messages: Chat, limit: int) -> Chat | None:
    """The conversation's end that renders to at most ``limit`` tokens with the template's generation prompt: the
    oldest turns go first (a leading system message stays), then the start of the last message's text. The
    template renders every kept turn, so each keeps its role header. None if not even that fits."""
    def length(conversation: Chat) -> int:
        return len(_encode_chat(tokenizer, conversation, generation_prompt=True))

    system = list(messages[:1]) if messages[0]["role"] == "system" and len(messages) > 1 else []
    rest = list(messages[len(system):])
    while len(rest) > 1 and length(system + rest) > limit:
        rest = rest[1:]
    while len(rest) > 1 and rest[0]["role"] != "user":  # templates expect a user turn first
        rest = rest[1:]
    if length(system + rest) <= limit:
        return system + rest
    last = rest[-1]
    room = limit - length(system + [{**last, "content": ""}])
    ids = tokenizer(last["content"], add_special_tokens=False)["input_ids"]
    while room > 0:
        conversation = system + [{**last, "content": tokenizer.decode(ids[len(ids) - room:])}]
        if length(conversation) <= limit:
            return conversation
        room -= 1
    return None


def check_tokenizer(tokenizer: Any) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token so that completions can end.")


def _is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    return not any(message["content"].strip() for message in completion)


PromptTruncation = Literal["keep_end", "drop"]
KEPT, TRUNCATED, PROMPT_TRUNCATED, SPECIAL_TEXT = "kept", "truncated", "prompt truncated", "special text"
IDENTICAL_TOKENS = "chosen and rejected tokenize identically"


def tokenize_row(row: Mapping[str, Any], index: int, tokenizer: Any, completion_fields: tuple[str, ...], *,
                 max_length: int, max_prompt_length: int | None,
                 prompt_truncation: PromptTruncation = "keep_end",
                 parse_special_tokens: bool = True) -> tuple[str, list[int], list[list[int]]]:
    """The rules of the module docstring for one row: ``(outcome, prompt_ids, [completion_ids, ...])``.

    ``outcome`` is a reason for dropping the row (a key of ``DataReport.dropped``; the ids are then empty), or what
    happened to a kept one: ``"kept"``, or ``"+"``-joined parts among ``"prompt truncated"``, ``"truncated"`` (with
    ``"cut<n>"``: n completions cut) and ``"special text"`` (a special token's string in the text; read as plain
    text when ``parse_special_tokens`` is False). ``tokenize_preferences`` and
    ``rpo_lib.data.sources.tokenize_dataset`` (through ``datasets.map``) both call it."""
    paired = len(completion_fields) == 2
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    prompt, texts = _row_parts(row, index, completion_fields)
    if any(_is_empty(text) for text in texts):
        return "empty completion", [], []
    if paired and texts[0] == texts[1]:
        return "chosen identical to rejected", [], []
    parts = []
    specials = special_strings(tokenizer)
    if any(marker in text for value in (prompt, *texts) for text in _texts(value) for marker in specials):
        parts.append(SPECIAL_TEXT)
    plain = not parse_special_tokens and bool(parts)
    if (max_prompt_length is not None and not isinstance(prompt, str)
            and len(_encode_chat(tokenizer, prompt, generation_prompt=True, plain=plain)) > max_prompt_length):
        if prompt_truncation == "drop":
            return "prompt too long", [], []
        prompt = _truncate_chat(tokenizer, prompt, max_prompt_length)
        if prompt is None:
            return "prompt too long", [], []
        parts.append(PROMPT_TRUNCATED)
    splits = [_split(tokenizer, prompt, text, plain) for text in texts]
    # The completion starts where prompt and prompt + completion first differ; the prompt kept is the part every
    # completion shares (a merge across the boundary can differ between completions).
    cut = min(_common_prefix(prompt_ids, full_ids) for prompt_ids, full_ids in splits)
    prompt_ids = splits[0][0][:cut]
    completions = [full_ids[cut:] for _, full_ids in splits]
    start = start_tokens(tokenizer)
    usable_bos = bos is not None and not _bos_opens_turns(tokenizer)
    if not prompt_ids:  # nothing before the completion: its first token would never be scored
        if start:
            prompt_ids = start
        elif usable_bos:
            prompt_ids = [bos]
        else:
            why = ("its bos_token opens a chat turn" if bos is not None else "the tokenizer has no BOS token")
            raise ValueError(f"row {index} has an empty prompt and {why}, so the completion's first token could not "
                             f"be scored: give the row a prompt, or set tokenizer.bos_token (GPT-2-style models use "
                             f"the EOS token).")
    if isinstance(prompt, str):  # text rows end with EOS (once); a template ends its turns itself
        completions = [ids if ids and ids[-1] == eos else ids + [eos] for ids in completions]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:  # text prompts (chats fit already)
        if prompt_truncation == "drop":
            return "prompt too long", [], []
        head = start if start and prompt_ids[:len(start)] == start else (
            [bos] if usable_bos and prompt_ids[0] == bos else [])
        prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)):]
        parts.append(PROMPT_TRUNCATED)
    if paired and completions[0] == completions[1]:  # different texts, same tokens: no gradient from DPO
        return IDENTICAL_TOKENS, [], []
    room = max_length - len(prompt_ids)
    if room <= 0:
        return "prompt too long", [], []
    cut_count = sum(len(ids) > room for ids in completions)
    if cut_count:
        completions = [ids[:room] for ids in completions]
        if paired and completions[0] == completions[1]:
            return "chosen identical to rejected", [], []
        parts += [TRUNCATED, f"cut{cut_count}"]
    return "+".join(parts) or KEPT, prompt_ids, completions


def new_report(rows_in: int, completion_fields: tuple[str, ...], outcomes: Iterable[str], what: str, *,
               parse_special_tokens: bool = True, text_rows_for_chat_model: bool = False) -> DataReport:
    """Count the outcomes of ``tokenize_row`` into a ``DataReport``."""
    paired = len(completion_fields) == 2
    dropped = {"empty completion": 0, **({"chosen identical to rejected": 0, IDENTICAL_TOKENS: 0} if paired else {}),
               "prompt too long": 0}
    kept = truncated = prompts_truncated = cut = special = 0
    for outcome in outcomes:
        if outcome in dropped:
            dropped[outcome] += 1
            continue
        kept += 1
        parts = outcome.split("+")
        truncated += TRUNCATED in parts
        prompts_truncated += PROMPT_TRUNCATED in parts
        special += SPECIAL_TEXT in parts
        cut += sum(int(part[3:]) for part in parts if part.startswith("cut"))
    return DataReport(rows_in=rows_in, kept=kept, dropped=dropped, truncated=truncated, what=what,
                      prompts_truncated=prompts_truncated, completions_cut=cut,
                      completions=kept * len(completion_fields), special_text=special,
                      parse_special_tokens=parse_special_tokens, text_rows_for_chat_model=text_rows_for_chat_model)


def text_rows_for_chat_model(rows: Any, tokenizer: Any) -> bool:
    """Whether text rows (a str prompt) are given to a tokenizer with a chat template; warns once if so: a chat model
    expects its template's turns, and text bypasses them without a word otherwise."""
    first = next(iter(rows), None) if not hasattr(rows, "column_names") else (rows[0] if len(rows) else None)
    if not getattr(tokenizer, "chat_template", None) or not isinstance(first, Mapping):
        return False
    value = first.get("prompt", first.get("chosen"))
    if not isinstance(value, str):
        return False
    warnings.warn("rpo_lib.data: these rows are plain text, and the tokenizer has a chat template: the text is "
                  "tokenized as it is, without the template's turns, which a chat model expects. Give the rows as "
                  "conversations ([{'role': 'user', 'content': ...}]) to render them through the template, or "
                  "ignore this if the text is already formatted as the model expects.", UserWarning, stacklevel=3)
    return True


def _tokenize_rows(rows: Iterable[Mapping[str, Any]], tokenizer: Any, completion_fields: tuple[str, ...], *,
                   max_length: int, max_prompt_length: int | None, what: str,
                   prompt_truncation: PromptTruncation = "keep_end", parse_special_tokens: bool = True
                   ) -> tuple[list[tuple[list[int], list[list[int]]]], DataReport]:
    """``tokenize_row`` over every row: ``[(prompt_ids, [completion_ids, ...])]`` of the kept ones, and the report."""
    check_tokenizer(tokenizer)
    rows = rows if hasattr(rows, "__len__") else list(rows)
    as_text = text_rows_for_chat_model(rows, tokenizer)
    kept: list[tuple[list[int], list[list[int]]]] = []
    outcomes = []
    for index, row in enumerate(rows):
        outcome, prompt_ids, completions = tokenize_row(row, index, tokenizer, completion_fields,
                                                        max_length=max_length, max_prompt_length=max_prompt_length,
                                                        prompt_truncation=prompt_truncation,
                                                        parse_special_tokens=parse_special_tokens)
        outcomes.append(outcome)
        if prompt_ids:
            kept.append((prompt_ids, completions))
    report = new_report(len(outcomes), completion_fields, outcomes, what, parse_special_tokens=parse_special_tokens,
                        text_rows_for_chat_model=as_text)
    if not kept:
        kind = "preference rows" if len(completion_fields) == 2 else "SFT rows"
        raise ValueError(f"no usable {kind}: {report} Check max_length and the data.")
    return kept, report


def _examples(rows: Any, tokenizer: Any, names: tuple[str, ...], kind: type, what: str, *, max_length: int,
              max_prompt_length: int | None, prompt_truncation: PromptTruncation,
              parse_special_tokens: bool = True) -> tuple[list[Any], DataReport]:
    """``kind(prompt_ids, *completion_ids)`` for every kept row, and the report. A dataset that
    ``rpo_lib.data.tokenize_dataset`` made (columns ``<field>_ids``) is taken as it is."""
    columns = getattr(rows, "column_names", None)
    if columns and all(f"{name}_ids" in columns for name in names):
        data = rows.select_columns([f"{name}_ids" for name in names]).with_format(None)
        examples = [kind(*(list(row[f"{name}_ids"]) for name in names)) for row in data]
        report = getattr(rows, "rpo_report", None)  # tokenize_dataset's report, carried on the dataset
        return examples, report or DataReport(rows_in=len(examples), kept=len(examples), what=what)
    kept, report = _tokenize_rows(rows, tokenizer, names[1:], max_length=max_length,
                                  max_prompt_length=max_prompt_length, what=what, prompt_truncation=prompt_truncation,
                                  parse_special_tokens=parse_special_tokens)
    return [kind(prompt, *completions) for prompt, completions in kept], report


def tokenize_preferences(rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                         max_prompt_length: int | None = None, prompt_truncation: PromptTruncation = "keep_end",
                         parse_special_tokens: bool = True) -> tuple[list[PreferenceExample], DataReport]:
    """Check and tokenize preference rows (see the module docstring for what happens to bad ones)."""
    return _examples(rows, tokenizer, PREFERENCE_FIELDS, PreferenceExample, "pairs", max_length=max_length,
                     max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation,
                     parse_special_tokens=parse_special_tokens)


def tokenize_sft(rows: Iterable[Mapping[str, Any]], tokenizer: Any, *, max_length: int,
                 max_prompt_length: int | None = None, prompt_truncation: PromptTruncation = "keep_end",
                 parse_special_tokens: bool = True) -> tuple[list[SFTExample], DataReport]:
    """Check and tokenize SFT rows ``{"prompt", "completion"}`` (same rules as for preferences)."""
    return _examples(rows, tokenizer, SFT_FIELDS, SFTExample, "rows", max_length=max_length,
                     max_prompt_length=max_prompt_length, prompt_truncation=prompt_truncation,
                     parse_special_tokens=parse_special_tokens)


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
