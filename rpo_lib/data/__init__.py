"""Data: preference and SFT rows -> checked, tokenized examples -> batches, with every dropped row counted.

- ``rpo_lib.data.rows``     the rules for one row (text or chat, implicit prompts, truncation, bad rows), lists of
                            rows -> examples, padded batches, fingerprints.
- ``rpo_lib.data.sources``  datasets by id or file (UltraFeedback, dpo-mix-7k, HH-RLHF, TL;DR) through schema
                            adapters; tokenization with ``datasets.map``.

Everything is importable from ``rpo_lib.data``.
"""

from rpo_lib.data.rows import (PREFERENCE_FIELDS, SFT_FIELDS, DataReport, PreferenceExample, PromptTruncation,
                               SFTExample, collate_preferences, collate_sft, fingerprint, pad_rows,
                               tokenize_preferences, tokenize_row, tokenize_sft)
from rpo_lib.data.sources import (SAMPLES_DIR, SCHEMAS, Schema, detect_schema, load_preferences, parse_hh,
                                  sample_file, tokenize_dataset)

__all__ = ["PREFERENCE_FIELDS", "SAMPLES_DIR", "SCHEMAS", "SFT_FIELDS", "DataReport", "PreferenceExample",
           "PromptTruncation", "SFTExample", "Schema", "collate_preferences", "collate_sft", "detect_schema",
           "fingerprint", "load_preferences", "pad_rows", "parse_hh", "sample_file", "tokenize_dataset",
           "tokenize_preferences", "tokenize_row", "tokenize_sft"]
