"""rpo_lib.data: TRL-compatible tokenization, and every bad row either an error or a counted drop."""

import pytest
import torch

from rpo_lib.data import DataReport, collate_preferences, tokenize_preferences, tokenize_sft
from rpo_lib.tasks import load_reference


@pytest.fixture(scope="module")
def tokenizer():
    return load_reference()[1]


def test_prompt_and_completion_split_with_eos(tokenizer):
    examples, report = tokenize_preferences([{"prompt": "fruit:", "chosen": " apple pear", "rejected": " cat"}],
                                            tokenizer, max_length=64)
    (example,) = examples
    assert tokenizer.convert_ids_to_tokens(example.prompt_ids) == ["<bos>", "▁fruit:"]
    assert tokenizer.convert_ids_to_tokens(example.chosen_ids) == ["▁apple", "▁pear", "<eos>"]
    assert tokenizer.convert_ids_to_tokens(example.rejected_ids) == ["▁cat", "<eos>"]
    assert (report.rows_in, report.kept, report.n_dropped, report.truncated) == (1, 1, 0, 0)
    assert str(report) == "kept 1 of 1 pairs."


def test_merge_across_the_boundary_moves_the_split(tokenizer):
    # "fruit" + ":" merges into one token "▁fruit:"; the completion starts where the tokenizations differ.
    (example,), _ = tokenize_preferences([{"prompt": "fruit", "chosen": ": apple", "rejected": ": cat"}],
                                         tokenizer, max_length=64)
    assert tokenizer.convert_ids_to_tokens(example.prompt_ids) == ["<bos>"]
    assert tokenizer.convert_ids_to_tokens(example.chosen_ids)[:2] == ["▁fruit:", "▁apple"]


@pytest.mark.parametrize("row, field", [
    ({"prompt": "fruit:", "chosen": " apple"}, "rejected"),
    ({"chosen": " apple", "rejected": " cat"}, "prompt"),
    ({"prompt": "fruit:", "chosen": None, "rejected": " cat"}, "chosen"),
])
def test_missing_field_is_an_error_naming_row_and_field(tokenizer, row, field):
    rows = [{"prompt": "fruit:", "chosen": " apple", "rejected": " cat"}, row]
    with pytest.raises(ValueError, match=rf"row 1 has no '{field}' field"):
        tokenize_preferences(rows, tokenizer, max_length=64)


def test_conversational_rows_are_an_error_that_says_what_to_do(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "fruit"}], "chosen": " apple", "rejected": " cat"}]
    with pytest.raises(ValueError, match="apply_chat_template"):
        tokenize_preferences(rows, tokenizer, max_length=64)


def test_bad_rows_are_dropped_and_counted(tokenizer):
    rows = [
        {"prompt": "fruit:", "chosen": " apple", "rejected": " cat"},  # kept
        {"prompt": "fruit:", "chosen": "  ", "rejected": " cat"},  # empty completion
        {"prompt": "fruit:", "chosen": " apple", "rejected": " apple"},  # identical
        {"prompt": "fruit animal color tool fruit animal color tool:", "chosen": " a", "rejected": " b"},  # too long
        {"prompt": "fruit:", "chosen": " apple pear plum grape lemon", "rejected": " cat dog"},  # truncated
    ]
    examples, report = tokenize_preferences(rows, tokenizer, max_length=6)
    assert report.kept == len(examples) == 2
    assert report.dropped == {"empty completion": 1, "chosen identical to rejected": 1, "prompt too long": 1}
    assert report.truncated == 1 and len(examples[1].chosen_ids) == 4  # 6 - 2 prompt tokens, EOS cut off
    assert str(report) == ("kept 2 of 5 pairs; dropped 1 (empty completion), 1 (chosen identical to rejected), "
                           "1 (prompt too long); 1 truncated to max_length.")


def test_pairs_identical_after_truncation_are_dropped(tokenizer):
    rows = [{"prompt": "fruit:", "chosen": " apple pear", "rejected": " apple cat"}]
    with pytest.raises(ValueError, match="no usable preference rows"):
        tokenize_preferences(rows, tokenizer, max_length=3)


def test_max_prompt_length_drops_long_prompts(tokenizer):
    rows = [{"prompt": "fruit animal:", "chosen": " apple", "rejected": " cat"},
            {"prompt": "fruit:", "chosen": " apple", "rejected": " cat"}]
    _, report = tokenize_preferences(rows, tokenizer, max_length=64, max_prompt_length=2)
    assert report.dropped["prompt too long"] == 1 and report.kept == 1


def test_sft_rows(tokenizer):
    examples, report = tokenize_sft([{"prompt": "fruit:", "completion": " apple"},
                                     {"prompt": "fruit:", "completion": ""}], tokenizer, max_length=64)
    assert report.dropped == {"empty completion": 1, "prompt too long": 0} and len(examples) == 1
    with pytest.raises(ValueError, match="row 0 has no 'completion' field"):
        tokenize_sft([{"prompt": "fruit:", "chosen": " apple"}], tokenizer, max_length=64)


def test_collate_puts_chosen_first_and_masks_completions(tokenizer):
    examples, _ = tokenize_preferences([{"prompt": "fruit:", "chosen": " apple pear", "rejected": " cat"},
                                        {"prompt": "fruit animal:", "chosen": " dog", "rejected": " red"}],
                                       tokenizer, max_length=64)
    batch = collate_preferences(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (4, 5)
    expected_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(batch["completion_mask"], expected_mask)
    assert torch.equal(batch["attention_mask"][2], torch.tensor([1, 1, 1, 1, 0]))
    assert int(batch["input_ids"][2, 4]) == tokenizer.pad_token_id


def test_report_sentence():
    assert str(DataReport(rows_in=3, kept=3)) == "kept 3 of 3 rows."
