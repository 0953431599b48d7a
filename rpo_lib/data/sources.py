"""Preference datasets by id or by file: schema adapters, and tokenization through ``datasets.map``.

::

    from rpo_lib.data import load_preferences, tokenize_dataset
    pairs = load_preferences("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")   # needs the hub
    pairs = load_preferences("data/samples/ultrafeedback_binarized.jsonl")                   # the same schema, local
    tokenized, report = tokenize_dataset(pairs, tokenizer, max_length=1024, max_prompt_length=512)
    trainer = Trainer(model, tokenizer, tokenized, config)

Every schema becomes the rows ``rpo_lib.data`` takes: ``{"prompt", "chosen", "rejected"}``, as text or as lists of
messages. The schema is found from the dataset id, or else from the columns (``schema=`` forces one):

=============== ================================================ ==================================================
schema          source                                           what the adapter does
=============== ================================================ ==================================================
ultrafeedback   ``HuggingFaceH4/ultrafeedback_binarized``        ``chosen``/``rejected`` are whole conversations;
                (splits ``train_prefs``, ``test_prefs``)         the prompt is their shared first messages, each
                                                                 completion its last message
dpo-mix         ``argilla/dpo-mix-7k`` (``train``, ``test``)     the same (conversations that share a beginning)
hh-rlhf         ``Anthropic/hh-rlhf`` (``train``, ``test``)      ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` text is
                                                                 parsed into messages; the last assistant turn is
                                                                 the completion
tldr            ``openai/summarize_from_feedback``,              the post becomes ``SUBREDDIT/TITLE/POST ... TL;DR:``
                config ``comparisons``                           text; ``summaries[choice]`` is chosen
preference      any file or dataset with ``prompt``, ``chosen``,  taken as it is
                ``rejected``
=============== ================================================ ==================================================

Each schema has a sample file in ``data/samples/`` (written by ``scripts/make_sample_data.py``; the tests read
them, since the hub is unreachable there). A local ``.jsonl``/``.json``/``.parquet`` file in a schema loads through
the same adapter.

Tokenization runs through ``datasets.map`` (``num_proc`` processes, results cached as Arrow files by the
dataset's fingerprint), row by row with ``rpo_lib.data.rows.tokenize_row``: the same rules, and the same tokens,
as ``tokenize_preferences``. The truncation policy: a prompt longer than ``max_prompt_length`` keeps its end (and
its BOS), completions are cut to the room left in ``max_length``; both are counted in the ``DataReport``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rpo_lib.data.rows import (PREFERENCE_FIELDS, DataReport, PromptTruncation, check_tokenizer, new_report,
                               text_rows_for_chat_model, tokenize_row)

__all__ = ["SAMPLES_DIR", "SCHEMAS", "Schema", "detect_schema", "load_preferences", "parse_hh", "sample_file",
           "tokenize_dataset"]

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "data" / "samples"


@dataclass(frozen=True)
class Schema:
    """How one dataset's rows become ``{"prompt", "chosen", "rejected"}``."""

    name: str
    dataset_ids: tuple[str, ...]  # hub ids in this schema
    columns: tuple[str, ...]  # columns that identify it
    adapt: Callable[[Mapping[str, Any]], dict[str, Any]]
    sample: str  # file name in data/samples/
    default_split: str = "train"
    config_name: str | None = None  # the hub dataset's configuration, if it has several


def _shared_conversation(row: Mapping[str, Any]) -> dict[str, Any]:
    """Two conversations that share their first messages: the prompt is those, the completions the last message."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise ValueError(f"expected 'chosen' and 'rejected' as lists of messages; got {type(chosen).__name__} and "
                         f"{type(rejected).__name__}. Pass schema='preference' for text rows.")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt or not prompt:
        raise ValueError("'chosen' and 'rejected' must be conversations that differ only in their last message: "
                         "this row's earlier messages differ (or there are none).")
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> list[dict[str, str]]:
    """Anthropic HH-RLHF text (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) as a list of messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"not HH-RLHF text (it must start with '\\n\\nHuman: '): {text[:60]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _hh(row: Mapping[str, Any]) -> dict[str, Any]:
    chosen, rejected = parse_hh(row["chosen"]), parse_hh(row["rejected"])
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("an HH-RLHF pair must end with the assistant's answer.")
    return _shared_conversation({"chosen": chosen, "rejected": rejected})


def _tldr(row: Mapping[str, Any]) -> dict[str, Any]:
    info, summaries, choice = row["info"], row["summaries"], int(row["choice"])
    if len(summaries) != 2 or choice not in (0, 1):
        raise ValueError(f"a TL;DR comparison needs two summaries and choice 0 or 1; got {len(summaries)} and "
                         f"{choice}.")
    post = info.get("post") or info.get("article") or ""
    prompt = f"SUBREDDIT: r/{info.get('subreddit') or ''}\nTITLE: {info.get('title') or ''}\nPOST: {post}\nTL;DR:"
    return {"prompt": prompt, "chosen": " " + summaries[choice]["text"].strip(),
            "rejected": " " + summaries[1 - choice]["text"].strip()}


def _as_is(row: Mapping[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in PREFERENCE_FIELDS}


SCHEMAS: dict[str, Schema] = {
    "ultrafeedback": Schema("ultrafeedback", ("HuggingFaceH4/ultrafeedback_binarized",),
                            ("prompt_id", "chosen", "rejected", "score_chosen"), _shared_conversation,
                            "ultrafeedback_binarized.jsonl", default_split="train_prefs"),
    "dpo-mix": Schema("dpo-mix", ("argilla/dpo-mix-7k",), ("dataset", "chosen", "rejected", "chosen_rating"),
                      _shared_conversation, "dpo_mix_7k.jsonl"),
    "hh-rlhf": Schema("hh-rlhf", ("Anthropic/hh-rlhf",), ("chosen", "rejected"), _hh, "hh_rlhf.jsonl"),
    "tldr": Schema("tldr", ("openai/summarize_from_feedback",), ("info", "summaries", "choice"), _tldr,
                   "tldr_comparisons.jsonl", config_name="comparisons"),
    "preference": Schema("preference", (), ("prompt", "chosen", "rejected"), _as_is, "preferences.jsonl"),
}


def sample_file(schema: str) -> Path:
    """The shipped sample file of a schema (``data/samples/...``)."""
    if schema not in SCHEMAS:
        raise ValueError(f"no schema {schema!r}; the schemas are {sorted(SCHEMAS)}.")
    return SAMPLES_DIR / SCHEMAS[schema].sample


def detect_schema(columns: list[str], first_row: Mapping[str, Any] | None = None, source: str = "") -> Schema:
    """The schema of a dataset, from its id, else from its columns (and, for text pairs, its first row)."""
    for schema in SCHEMAS.values():
        if source in schema.dataset_ids:
            return schema
    names = set(columns)
    for key in ("ultrafeedback", "dpo-mix", "tldr", "preference"):
        if set(SCHEMAS[key].columns) <= names:
            return SCHEMAS[key]
    if {"chosen", "rejected"} <= names:
        chosen = (first_row or {}).get("chosen")
        if isinstance(chosen, str) and chosen.lstrip(" ").startswith(("\n\nHuman:", "Human:")):
            return SCHEMAS["hh-rlhf"]
        if isinstance(chosen, list):
            return Schema("conversation", (), ("chosen", "rejected"), _shared_conversation, "")
    raise ValueError(f"cannot tell the schema of {source or 'this dataset'} from its columns {sorted(names)}: pass "
                     f"schema= one of {sorted(SCHEMAS)}, or give rows with 'prompt', 'chosen' and 'rejected'.")


def load_preferences(source: str | os.PathLike, *, split: str | None = None, schema: str | None = None,
                     num_proc: int | None = None, limit: int | None = None, revision: str | None = None) -> Any:
    """A ``datasets.Dataset`` of ``{"prompt", "chosen", "rejected"}`` rows from a hub id or a local file.

    Args:
        source: a hub dataset id (``"HuggingFaceH4/ultrafeedback_binarized"``), or a ``.jsonl``/``.json``/
            ``.parquet`` file or a directory of them, in one of the schemas of the module docstring.
        split: the split; default: the schema's (``train_prefs`` for UltraFeedback, else ``train``).
        schema: force a schema (a key of ``SCHEMAS``); default: from the id, else from the columns.
        num_proc: processes for the adapter's ``map``.
        limit: keep only the first ``limit`` rows (before adapting).
        revision: a hub branch, tag or commit.
    """
    import datasets

    path = Path(os.fspath(source))
    if schema is not None and schema not in SCHEMAS:
        raise ValueError(f"no schema {schema!r}; the schemas are {sorted(SCHEMAS)}.")
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet")) if path.is_dir() \
            else [path]
        if not files:
            raise ValueError(f"{path} holds no .jsonl, .json or .parquet file.")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        dataset = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    else:
        known = next((s for s in SCHEMAS.values() if os.fspath(source) in s.dataset_ids), None)
        chosen = SCHEMAS[schema] if schema is not None else known
        name = chosen.config_name if chosen is not None else None
        try:
            dataset = datasets.load_dataset(os.fspath(source), name,
                                            split=split or (chosen.default_split if chosen else "train"),
                                            revision=revision)
        except Exception as error:  # the hub raises many kinds; say what to do
            raise OSError(f"could not load the dataset {source!s}: {error}\nOffline (HF_HUB_OFFLINE=1, or no "
                          f"network), give a local file in the same schema instead, e.g. "
                          f"{sample_file(chosen.name if chosen else 'preference')}.") from error
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    found = SCHEMAS[schema] if schema is not None else detect_schema(
        dataset.column_names, dataset[0] if len(dataset) else None, os.fspath(source))
    return dataset.map(found.adapt, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc=f"{found.name} rows")


def tokenize_dataset(dataset: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int | None = None,
                     prompt_truncation: PromptTruncation = "keep_end", num_proc: int | None = None,
                     parse_special_tokens: bool = True) -> tuple[Any, DataReport]:
    """Tokenize ``{"prompt", "chosen", "rejected"}`` rows with ``datasets.map``: ``(dataset, report)``.

    The dataset returned has the columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``length`` (prompt plus
    the longer completion, for length grouping); dropped rows are gone and counted in the report. ``Trainer`` takes
    it as its rows. ``map`` caches the result by the input's fingerprint and the arguments, so a second call with the
    same data and settings reads it from disk. The report rides along as ``dataset.rpo_report``, so that the
    trainer can warn about cut completions."""
    check_tokenizer(tokenizer)
    fields = PREFERENCE_FIELDS[1:]
    as_text = text_rows_for_chat_model(dataset, tokenizer)

    def one(row: Mapping[str, Any], index: int) -> dict[str, Any]:
        outcome, prompt_ids, completions = tokenize_row(row, index, tokenizer, fields, max_length=max_length,
                                                        max_prompt_length=max_prompt_length,
                                                        prompt_truncation=prompt_truncation,
                                                        parse_special_tokens=parse_special_tokens)
        chosen, rejected = completions if completions else ([], [])
        return {"outcome": outcome, "prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected,
                "length": len(prompt_ids) + max(len(chosen), len(rejected))}

    mapped = dataset.map(one, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                         desc="tokenizing")
    report = new_report(len(mapped), fields, mapped["outcome"], "pairs", parse_special_tokens=parse_special_tokens,
                        text_rows_for_chat_model=as_text)
    kept = mapped.filter(lambda length: length > 0, input_columns="length", num_proc=num_proc)
    kept = kept.remove_columns("outcome")
    if len(kept) == 0:
        raise ValueError(f"no usable preference rows: {report} Check max_length and the data.")
    kept.rpo_report = report
    return kept, report
