"""Padding-free batches score every sequence exactly as a padded batch does: log-probs and gradients."""

import copy
import os

import pytest
import torch

from rpo_lib import packing
from rpo_lib.data import load_preferences, pad_rows, sample_file
from rpo_lib.logprobs import completion_logprobs
from rpo_lib.models import LoraSettings, TinyLMConfig, load_policy, tiny_causal_lm
from rpo_lib.train import Trainer, preset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ATOL, RTOL = 1e-5, 1e-6  # float32: the two paths sum the same terms in different orders


def random_sequences(seed, n, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n):
        p = int(torch.randint(1, 12, (1,), generator=generator))
        c = int(torch.randint(1, 20, (1,), generator=generator))
        prompts.append([1] + torch.randint(3, vocab, (p - 1,), generator=generator).tolist())
        completions.append(torch.randint(3, vocab, (c,), generator=generator).tolist())
    return prompts, completions


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(TinyLMConfig(max_position_embeddings=128), seed=0)


def padded_logps(model, prompts, completions):
    batch = pad_rows(prompts, completions, pad_token_id=0)
    return completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_equals_padded_for_chosen_and_rejected(model, seed):
    prompts, chosen = random_sequences(seed, 6)
    _, rejected = random_sequences(seed + 100, 6)
    all_prompts, all_completions = prompts * 2, chosen + rejected  # collate_preferences' layout
    batch = packing.pack_sequences(all_prompts, all_completions, max_row_tokens=64, pad_token_id=0)
    assert batch.input_ids.shape[0] < len(all_prompts)  # several sequences share a row
    packed, counts = packing.packed_completion_logprobs(model, batch)
    padded = padded_logps(model, all_prompts, all_completions)
    torch.testing.assert_close(packed, padded, atol=ATOL, rtol=RTOL)
    varlen, _ = packing.packed_completion_logprobs(model, batch, attention="varlen")
    torch.testing.assert_close(varlen, padded, atol=ATOL, rtol=RTOL)
    assert counts.tolist() == [len(c) for c in all_completions]
    mean, _ = packing.packed_completion_logprobs(model, batch, reduction="mean")
    torch.testing.assert_close(mean, padded / counts, atol=ATOL, rtol=RTOL)


def test_packed_gradients_equal_padded_gradients(model):
    prompts, completions = random_sequences(7, 8)
    weights = torch.linspace(-1, 1, 8)  # a loss that weighs every sequence differently

    def grads(fn):
        model.zero_grad()
        (weights * fn()).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    batch = packing.pack_sequences(prompts, completions, max_row_tokens=48, pad_token_id=0)
    packed = grads(lambda: packing.packed_completion_logprobs(model, batch)[0])
    padded = grads(lambda: padded_logps(model, prompts, completions))
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_plain_attention_mask_lets_packed_sequences_attend_to_each_other(model):
    """Why the block-causal mask exists: with a 2D mask of ones (what a padded collator passes) and restarting
    position ids, the second sequence of a row attends to the first."""
    prompts, completions = random_sequences(3, 2)
    batch = packing.pack_sequences(prompts, completions, max_row_tokens=200, pad_token_id=0)
    assert batch.input_ids.shape[0] == 1
    leaky = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  attention_mask=torch.ones_like(batch.input_ids)).logits
    isolated = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                     attention_mask=batch.block_causal_mask()).logits
    second = batch.sequence_index[0] == batch.sequence_index[0, -1]
    assert (leaky[0, second] - isolated[0, second]).abs().max() > 1e-3


def test_packing_removes_padding_and_keeps_every_token():
    prompts, completions = random_sequences(11, 32)
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    batch = packing.pack_sequences(prompts, completions, max_row_tokens=128, pad_token_id=0)
    assert batch.real_tokens == sum(lengths)
    packed_pad = packing.padding_fraction(lengths, packed_rows=batch.input_ids.shape[0],
                                          row_tokens=batch.input_ids.shape[1])
    assert packed_pad < packing.padding_fraction(lengths) / 2  # first-fit decreasing; only the last row is short
    for i, length in enumerate(lengths):  # each sequence is contiguous, positions restart at 0
        row, cols = torch.nonzero(batch.sequence_index == i, as_tuple=True)
        assert len(set(row.tolist())) == 1 and batch.position_ids[row, cols].tolist() == list(range(length))


def test_pack_refuses_empty_prompts_and_overlong_sequences():
    with pytest.raises(ValueError, match="empty prompt"):
        packing.pack_sequences([[]], [[5]], max_row_tokens=8, pad_token_id=0)
    with pytest.raises(ValueError, match="raise max_row_tokens"):
        packing.pack_sequences([[1, 2]], [[5] * 10], max_row_tokens=8, pad_token_id=0)


# -------------------------------------------------------------------------------------- the trainer's padding-free step
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "rpo", "sft"])
def test_padding_free_step_equals_the_padded_step(checkpoint, method):
    model, tokenizer = load_policy(checkpoint, quantization=None, lora=LoraSettings(r=4),
                                   gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    rows = list(load_preferences(sample_file("ultrafeedback")))
    if method == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    grads, losses = [], []
    for padding_free in (False, True):
        config = preset("tiny", method=method, batch_size=8, micro_batch_size=3, max_length=96, progress=False,
                        padding_free=padding_free, max_grad_norm=None, rpo_variant="trl")
        trainer = Trainer(copy.deepcopy(model), tokenizer, rows, config)
        losses.append(trainer._optimizer_step(0)["loss"])
        grads.append([p.grad.clone() for p in trainer.parameters])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for padded, packed in zip(*grads, strict=True):
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-6)
