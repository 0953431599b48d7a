"""rpo_lib.data: TRL-compatible tokenization, and every bad row either an error or a counted drop."""

import copy
import json

import pytest
import torch

from rpo_lib.data import (
    SCHEMAS,
    DataReport,
    collate_preferences,
    fingerprint,
    load_preferences,
    parse_hh,
    sample_file,
    tokenize_dataset,
    tokenize_preferences,
    tokenize_sft,
)
from rpo_lib.models import load_policy
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
    with pytest.raises(ValueError, match=rf"row 1 has no '{field}'"):
        tokenize_preferences(rows, tokenizer, max_length=64)


def test_text_and_messages_mixed_in_a_row_is_an_error(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "fruit"}], "chosen": " apple", "rejected": " cat"}]
    with pytest.raises(ValueError, match=r"row 0 mixes text \(chosen, rejected\) and messages \(prompt\)"):
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
    assert report.dropped == {"empty completion": 1, "chosen identical to rejected": 1,
                              "chosen and rejected tokenize identically": 0, "prompt too long": 1}
    assert report.truncated == 1 and len(examples[1].chosen_ids) == 4  # 6 - 2 prompt tokens, EOS cut off
    assert report.completions_cut == 1 and report.completions == 4 and report.cut_share == 0.25
    assert str(report) == ("kept 2 of 5 pairs; dropped 1 (empty completion), 1 (chosen identical to rejected), "
                           "1 (prompt too long); 1 truncated to max_length (1 of 4 completions cut, 25%, each losing "
                           "its end of turn).")


def test_pairs_identical_after_truncation_are_dropped(tokenizer):
    rows = [{"prompt": "fruit:", "chosen": " apple pear", "rejected": " apple cat"}]
    with pytest.raises(ValueError, match="no usable preference rows"):
        tokenize_preferences(rows, tokenizer, max_length=3)


def test_max_prompt_length_cuts_or_drops_long_prompts(tokenizer):
    rows = [{"prompt": "fruit animal:", "chosen": " apple", "rejected": " cat"},
            {"prompt": "fruit:", "chosen": " apple", "rejected": " cat"}]
    _, report = tokenize_preferences(rows, tokenizer, max_length=64, max_prompt_length=2, prompt_truncation="drop")
    assert report.dropped["prompt too long"] == 1 and report.kept == 1
    examples, report = tokenize_preferences(rows, tokenizer, max_length=64, max_prompt_length=2)
    assert report.kept == 2 and report.prompts_truncated == 1
    assert tokenizer.convert_ids_to_tokens(examples[0].prompt_ids) == ["<bos>", "▁animal:"]  # BOS + the end


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


# ------------------------------------------------------------------------------ chat formats and specials
# A Llama-2/Zephyr-style template: the template writes the BOS token itself and ends every turn with EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def test_chat_rows_have_one_bos_and_one_eos(chat_tokenizer):
    row = {"prompt": _user("fruit"), "chosen": _assistant("apple pear"), "rejected": _assistant("cat")}
    (example,), _ = tokenize_preferences([row], chat_tokenizer, max_length=64)
    bos, eos = chat_tokenizer.bos_token_id, chat_tokenizer.eos_token_id
    assert example.prompt_ids[0] == bos and example.prompt_ids.count(bos) == 1
    for ids in (example.chosen_ids, example.rejected_ids):
        assert ids[-1] == eos and ids[-2] != eos and bos not in ids
    assert chat_tokenizer.decode(example.chosen_ids) == "apple pear<eos>"


def test_the_rendered_text_recipe_gives_the_chat_rows_tokens(chat_tokenizer):
    """Rows rendered with apply_chat_template(..., tokenize=False) start with the BOS text and end with the
    EOS text: they get no second BOS and no second EOS, so they tokenize exactly as the chat rows do."""
    prompt, chosen, rejected = _user("fruit"), _assistant("apple pear"), _assistant("cat")
    render = lambda messages, gen=False: chat_tokenizer.apply_chat_template(messages, tokenize=False,  # noqa: E731
                                                                            add_generation_prompt=gen)
    prompt_text = render(prompt, True)
    text_row = {"prompt": prompt_text, "chosen": render(prompt + chosen)[len(prompt_text):],
                "rejected": render(prompt + rejected)[len(prompt_text):]}
    assert text_row["prompt"].startswith("<bos>") and text_row["chosen"].endswith("<eos>")
    chat_row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    (from_text,), _ = tokenize_preferences([text_row], chat_tokenizer, max_length=64)
    (from_chat,), _ = tokenize_preferences([chat_row], chat_tokenizer, max_length=64)
    assert from_text == from_chat


def test_text_that_already_ends_with_eos_gets_no_second_one(tokenizer):
    (example,), _ = tokenize_preferences([{"prompt": "fruit:", "chosen": " apple<eos>", "rejected": " cat"}],
                                         tokenizer, max_length=64)
    assert tokenizer.convert_ids_to_tokens(example.chosen_ids) == ["▁apple", "<eos>"]
    assert tokenizer.convert_ids_to_tokens(example.rejected_ids) == ["▁cat", "<eos>"]


def test_implicit_prompts_text_and_chat(tokenizer, chat_tokenizer):
    (text,), _ = tokenize_preferences([{"chosen": "fruit: apple pear", "rejected": "fruit: cat"}], tokenizer,
                                      max_length=64)
    assert tokenizer.convert_ids_to_tokens(text.prompt_ids) == ["<bos>", "▁fruit:"]
    assert tokenizer.convert_ids_to_tokens(text.chosen_ids) == ["▁apple", "▁pear", "<eos>"]
    chats = {"chosen": _user("fruit") + _assistant("apple pear"), "rejected": _user("fruit") + _assistant("cat")}
    explicit = {"prompt": _user("fruit"), "chosen": _assistant("apple pear"), "rejected": _assistant("cat")}
    assert tokenize_preferences([chats], chat_tokenizer, max_length=64)[0] == \
        tokenize_preferences([explicit], chat_tokenizer, max_length=64)[0]


def test_sft_messages_train_on_the_last_assistant_message(chat_tokenizer):
    messages = _user("fruit") + _assistant("apple") + _user("more") + _assistant("pear plum")
    (example,), _ = tokenize_sft([{"messages": messages}], chat_tokenizer, max_length=64)
    assert chat_tokenizer.decode(example.completion_ids) == "pear plum<eos>"
    assert chat_tokenizer.decode(example.prompt_ids).endswith("user: more<eos> assistant:")
    (explicit,), _ = tokenize_sft([{"prompt": messages[:-1], "completion": messages[-1:]}], chat_tokenizer,
                                  max_length=64)
    assert explicit == example


@pytest.mark.parametrize("row, message", [
    ({"messages": _user("fruit")}, "must end with the assistant's message"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "message 0 needs a 'role' and a text"),
    ({"messages": "fruit: apple"}, "expected text or a non-empty list of messages"),
])
def test_bad_conversations_are_errors_naming_the_row(chat_tokenizer, row, message):
    with pytest.raises(ValueError, match=f"row 0.*{message}"):
        tokenize_sft([row], chat_tokenizer, max_length=64)


def test_chat_rows_without_a_chat_template_say_what_to_do(tokenizer):
    row = {"prompt": _user("fruit"), "chosen": _assistant("apple"), "rejected": _assistant("cat")}
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        tokenize_preferences([row], tokenizer, max_length=64)


def _without_automatic_bos(tokenizer, *, bos):
    """The same vocabulary with no BOS added by the tokenizer (GPT-2 style if ``bos``, else no BOS at all)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    core.post_processor = processors.Sequence([])
    specials = {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=core, **({"bos_token": "<bos>"} if bos else {}), **specials)


def test_an_empty_prompt_still_scores_the_first_completion_token(tokenizer):
    gpt2_style = _without_automatic_bos(tokenizer, bos=True)
    assert gpt2_style("fruit:")["input_ids"][0] != gpt2_style.bos_token_id  # it does not add BOS itself
    (example,), _ = tokenize_preferences([{"prompt": "", "chosen": "apple", "rejected": "cat"}], gpt2_style,
                                         max_length=64)
    assert example.prompt_ids == [gpt2_style.bos_token_id]  # the completion's first token has a context
    batch = collate_preferences([example], gpt2_style.pad_token_id)
    assert batch["completion_mask"][:, 0].sum() == 0 and batch["completion_mask"][0, 1] == 1  # and is scored
    no_bos = _without_automatic_bos(tokenizer, bos=False)
    with pytest.raises(ValueError, match="row 0 has an empty prompt and the tokenizer has no BOS token"):
        tokenize_preferences([{"prompt": "", "chosen": "apple", "rejected": "cat"}], no_bos, max_length=64)
    (kept,), _ = tokenize_preferences([{"prompt": "fruit:", "chosen": " apple", "rejected": " cat"}], no_bos,
                                      max_length=64)
    assert no_bos.convert_ids_to_tokens(kept.prompt_ids) == ["▁fruit:"]  # a prompt needs no BOS


@pytest.mark.parametrize("form", ["explicit chat", "implicit chat", "implicit text"])
def test_tokens_equal_trl_dpo_trainers(chat_tokenizer, tmp_path, form):
    """TRL 1.16's DPOTrainer prepares the same prompt, chosen and rejected token ids."""
    trl = pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[dev]'")
    from datasets import Dataset

    from rpo_lib.tasks import load_reference

    pairs = [("fruit", "apple pear", "cat"), ("animal tool", "dog saw", "red"), ("color", "blue", "green white")]
    if form == "explicit chat":
        rows = [{"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant(r)} for p, c, r in pairs]
    elif form == "implicit chat":
        rows = [{"chosen": _user(p) + _assistant(c), "rejected": _user(p) + _assistant(r)} for p, c, r in pairs]
    else:
        rows = [{"chosen": f"{p}: {c}", "rejected": f"{p}: {r}"} for p, c, r in pairs]
    model = load_reference()[0]
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], save_strategy="no")
    theirs = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=chat_tokenizer).train_dataset
    ours, _ = tokenize_preferences(rows, chat_tokenizer, max_length=256)
    for mine, row in zip(ours, theirs, strict=True):
        assert (mine.prompt_ids, mine.chosen_ids, mine.rejected_ids) == (
            row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


def test_fingerprint_changes_with_any_token():
    from rpo_lib.data import PreferenceExample

    a = [PreferenceExample([1, 5], [7, 2], [8, 2])]
    assert fingerprint(a) == fingerprint([PreferenceExample([1, 5], [7, 2], [8, 2])])
    assert fingerprint(a) != fingerprint([PreferenceExample([1, 5, 7], [2], [8, 2])])  # same tokens, other split
    assert fingerprint(a) != fingerprint([PreferenceExample([1, 5], [7, 2], [9, 2])])


def test_pairs_that_tokenize_identically_are_dropped_and_counted(tokenizer):
    """Two different texts the tokenizer maps alike (unknown characters become <unk>) give DPO no gradient."""
    rows = [{"prompt": "fruit:", "chosen": " ☃", "rejected": " ☂"},
            {"prompt": "fruit:", "chosen": " apple", "rejected": " cat"}]
    examples, report = tokenize_preferences(rows, tokenizer, max_length=64)
    assert len(examples) == report.kept == 1
    assert report.dropped["chosen and rejected tokenize identically"] == 1
    assert "1 (chosen and rejected tokenize identically)" in str(report)


def test_a_prompt_cut_alone_is_not_counted_as_a_truncated_completion(tokenizer):
    rows = [{"prompt": "fruit animal color tool fruit animal color tool:", "chosen": " apple", "rejected": " cat"}]
    (example,), report = tokenize_preferences(rows, tokenizer, max_length=64, max_prompt_length=3)
    assert report.prompts_truncated == 1 and report.truncated == 0 and report.completions_cut == 0
    assert "truncated to max_length" not in str(report) and "prompts cut to max_prompt_length" in str(report)
    assert example.prompt_ids[0] == tokenizer.bos_token_id and len(example.prompt_ids) == 3


def test_a_long_chat_prompt_keeps_the_templates_bos_and_whole_turns(chat_tokenizer):
    """Under a template that writes its own BOS (Llama-2/Zephyr style), a chat prompt over max_prompt_length loses
    its oldest turns, and what is kept is rendered again: one BOS first, every turn whole with its role."""
    turns = (_user("fruit animal color tool fruit animal") + _assistant("apple dog red saw")
             + _user("fruit color"))
    row = {"prompt": turns, "chosen": _assistant("pear"), "rejected": _assistant("cat")}
    (full,), _ = tokenize_preferences([row], chat_tokenizer, max_length=128)
    (example,), report = tokenize_preferences([row], chat_tokenizer, max_length=128, max_prompt_length=20)
    assert report.prompts_truncated == 1 and report.truncated == 0
    assert len(example.prompt_ids) <= 20 < len(full.prompt_ids)
    (alone,), _ = tokenize_preferences([{**row, "prompt": _user("fruit color")}], chat_tokenizer, max_length=128)
    assert example == alone  # exactly the last turn, rendered as if it were the whole conversation
    assert example.prompt_ids[0] == chat_tokenizer.bos_token_id and example.prompt_ids.count(
        chat_tokenizer.bos_token_id) == 1


# ------------------------------------------------------------------------------- dataset schemas and their sample files
EXPECTED_FIRST_CHOSEN = {
    "ultrafeedback": "Lower the egg into water",
    "dpo-mix": "Lower the egg into water",
    "hh-rlhf": "Lower the egg into water",
    "tldr": " Thin pot plus high heat",
    "preference": " Lower the egg into water",
}


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_every_schema_sample_loads_into_prompt_chosen_rejected(schema):
    rows = load_preferences(sample_file(schema))
    assert set(rows.column_names) == {"prompt", "chosen", "rejected"} and len(rows) >= 4
    first = rows[0]
    chosen = first["chosen"] if isinstance(first["chosen"], str) else first["chosen"][-1]["content"]
    assert chosen.startswith(EXPECTED_FIRST_CHOSEN[schema])
    if not isinstance(first["prompt"], str):  # conversations: the prompt ends with the user's turn
        assert first["prompt"][-1]["role"] == "user" and first["chosen"][0]["role"] == "assistant"


def test_schema_is_detected_from_the_columns_and_can_be_forced():
    raw = [json.loads(line) for line in sample_file("tldr").read_text().splitlines()]
    assert raw[1]["choice"] == 1  # the better summary is second in this row: the adapter must follow `choice`
    rows = load_preferences(sample_file("tldr"))
    assert rows[1]["chosen"].strip() == raw[1]["summaries"][1]["text"]
    assert rows[0]["prompt"].startswith("SUBREDDIT: r/cooking\nTITLE:") and rows[0]["prompt"].endswith("TL;DR:")
    with pytest.raises(ValueError, match="lists of messages"):
        load_preferences(sample_file("preference"), schema="ultrafeedback")


def test_hh_text_is_parsed_into_turns():
    text = "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4."
    assert parse_hh(text) == [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    with pytest.raises(ValueError, match="HH-RLHF"):
        parse_hh("Hi there")


def test_unreachable_hub_id_says_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local file in the same schema"):
        load_preferences("HuggingFaceH4/ultrafeedback_binarized")


@pytest.mark.parametrize("schema", ["ultrafeedback", "hh-rlhf", "tldr"])
def test_datasets_map_gives_the_tokens_of_the_list_path(checkpoint, schema):
    _, tokenizer = load_policy(checkpoint, quantization=None, lora=None, gradient_checkpointing=False)
    rows = load_preferences(sample_file(schema))
    tokenized, report = tokenize_dataset(rows, tokenizer, max_length=80, max_prompt_length=40)
    examples, list_report = tokenize_preferences(list(rows), tokenizer, max_length=80, max_prompt_length=40)
    assert str(report) == str(list_report)
    assert [r["chosen_ids"] for r in tokenized] == [e.chosen_ids for e in examples]
    assert [r["prompt_ids"] for r in tokenized] == [e.prompt_ids for e in examples]
    assert all(len(r["prompt_ids"]) <= 40 and r["length"] <= 80 for r in tokenized)


def test_truncation_policy_keeps_the_prompt_end_and_counts_it(checkpoint):
    _, tokenizer = load_policy(checkpoint, quantization=None, lora=None, gradient_checkpointing=False)
    row = {"prompt": "one two three four five six seven eight nine ten", "chosen": " yes", "rejected": " no"}
    full, _ = tokenize_preferences([row], tokenizer, max_length=64)
    (kept,), report = tokenize_preferences([row], tokenizer, max_length=64, max_prompt_length=5)
    assert kept.prompt_ids == full[0].prompt_ids[:1] + full[0].prompt_ids[-4:]  # BOS + the last 4 tokens
    assert report.prompts_truncated == 1 and "1 prompts cut" in str(report)
    _, dropped = tokenize_preferences([row, {**row, "prompt": "hi"}], tokenizer, max_length=64, max_prompt_length=5,
                                      prompt_truncation="drop")
    assert dropped.dropped["prompt too long"] == 1 and dropped.kept == 1


def test_sample_files_are_what_the_script_writes():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sample_data.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
