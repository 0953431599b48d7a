import os

# No hub here: a failed lookup would cost ~46 s per call. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402  (after the environment is set: these imports may load transformers)

from rpo_lib.tasks import DATA_DIR, load_reference, read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    """The shipped reference policy and its tokenizer (data/gold_task), loaded once per test module."""
    return load_reference()


@pytest.fixture(scope="module")
def pairs():
    """The first 64 preference pairs of data/gold_task/preferences.jsonl."""
    return read_jsonl(DATA_DIR / "preferences.jsonl")[:64]
