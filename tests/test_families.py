"""Every decoder family rpo_lib is checked on (``rpo_lib.families``): padding-free training is exact or refused,
and sampling and the padded log-probs are exact.

Tolerances (float32 on a CPU). Packed and padded batches add the same terms in other orders and shapes: the loss
agrees to 1e-4 relative (measured: 1e-7) and every gradient to 1e-3 relative to its own size, or to a thousandth of
the largest gradient where a tensor's is zero in exact arithmetic (a key bias);
the families that are wrong are wrong by 1e-2 to 1 and more (a window dropped: gradient cosine 0.34; Gemma-2's
soft-capping skipped: loss 690 against 153). Sampling compares tokens drawn greedily or from the same per-row
uniforms: the heads are scaled up (logit gaps of 0.1 and more), far above float32 rounding (1e-5).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from rpo_lib import packing
from rpo_lib.data import load_preferences, pad_rows, sample_file
from rpo_lib.families import FAMILIES, tiny_family_model
from rpo_lib.logprobs import completion_logprobs
from rpo_lib.sample import row_seed, sample
from rpo_lib.train import Trainer, preset

README = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"  # the trainer's reference: the families
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3
MODES = ("mask", "varlen")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from rpo_lib.models import tiny_checkpoint

    rows = list(load_preferences(sample_file("ultrafeedback")))
    texts = [m["content"] for row in rows for key in ("prompt", "chosen", "rejected") for m in row[key]]
    directory = tiny_checkpoint(tmp_path_factory.mktemp("tok") / "m", texts, vocab_size=256)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def rows():
    return list(load_preferences(sample_file("ultrafeedback")))


def _model(name, tokenizer):
    return tiny_family_model(name, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _trainer(model, tokenizer, rows, **changes):
    """RPO (DPO + the token-mean SFT term), 6 pairs a step in micro-batches of 3, full fine-tuning."""
    config = preset("tiny", method="rpo", rpo_variant="trl", sft_weight=1.0, batch_size=6, micro_batch_size=3,
                    max_length=96, max_grad_norm=None, progress=False, **changes)
    return Trainer(copy.deepcopy(model), tokenizer, rows, config)


def _step(model, tokenizer, rows, **changes):
    """Loss and gradients of one step of ``_trainer``."""
    trainer = _trainer(model, tokenizer, rows, **changes)
    loss = trainer._optimizer_step(0)["loss"]
    return loss, {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def readme_table() -> dict[str, dict[str, str]]:
    """docs/trainer.md's table of families: name -> {"mask": ..., "varlen": ...}."""
    table = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\s*\|\s*`(\w+)`\s*\|[^|]*\|\s*(exact|refused)\s*\|\s*(exact|refused)\s*\|", line)
        if match:
            table[match.group(1)] = {"mask": match.group(2), "varlen": match.group(3)}
    return table


def test_the_readme_lists_every_family_as_rpo_lib_declares_it():
    assert readme_table() == {name: family.packing for name, family in FAMILIES.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_packed_step_equals_the_padded_step_or_is_refused(name, mode, tokenizer, rows):
    """One training step on packed rows gives the padded step's loss and every gradient, or the Trainer refuses
    the family when it is built, naming the model class and the way out. Which happens is what FAMILIES (and the
    README) declare."""
    model = _model(name, tokenizer)
    expected = FAMILIES[name].packing[mode]
    if expected == "refused":
        with pytest.raises(ValueError, match=rf"{type(model).__name__}.*padding_free=False"):
            _trainer(model, tokenizer, rows, padding_free=True, packing_attention=mode)  # refused when it is built
        return
    padded_loss, padded = _step(model, tokenizer, rows)
    packed_loss, packed = _step(model, tokenizer, rows, padding_free=True, packing_attention=mode)
    assert packed_loss == pytest.approx(padded_loss, rel=LOSS_RTOL)
    assert set(packed) == set(padded) and len(padded) > 4
    largest = max(float(grad.abs().max()) for grad in padded.values())
    for key, grad in padded.items():  # a gradient that is zero in exact arithmetic (a key bias) is rounding only
        scale = max(float(grad.abs().max()), 1e-3 * largest)
        assert float((packed[key] - grad).abs().max()) < GRAD_RTOL * scale, key


def test_the_measurement_refuses_what_no_rule_names(tokenizer, rows, monkeypatch):
    """Without its rule, OPT under varlen (its mask ignores position_ids) is caught by the Trainer's agreement check:
    one micro-batch scored both ways before training."""
    monkeypatch.setattr(packing, "_REFUSED", {})
    model = _model("opt", tokenizer)
    with pytest.raises(ValueError, match=r"OPTForCausalLM\) scores packed rows differently .* padding_free=False"):
        _trainer(model, tokenizer, rows, padding_free=True, packing_attention="varlen")


def test_a_window_shorter_than_the_row_is_applied_per_layer_kind():
    """Mistral slides on every layer: one windowed mask. Qwen2 on one layer of two: a mask per layer kind."""
    batch = packing.pack_sequences([[1, 5], [1]], [[6, 7, 8, 9, 10, 11], [4]], max_row_tokens=16, pad_token_id=0)
    mistral = tiny_family_model("mistral", vocab_size=16)
    qwen2 = tiny_family_model("qwen2", vocab_size=16)
    one = packing.attention_mask(mistral, batch, "mask", torch.float32)
    both = packing.attention_mask(qwen2, batch, "mask", torch.float32)
    assert isinstance(one, torch.Tensor) and set(both) == {"full_attention", "sliding_attention"}
    allowed = one[0, 0] == 0
    assert bool(allowed[7, 3]) and not bool(allowed[7, 2])  # query 7 sees keys 3..7: a window of 5
    assert bool((both["full_attention"][0, 0] == 0)[7, 0])
    assert not bool(allowed[9, 7])  # another sequence
    assert packing.attention_mask(mistral, batch, "varlen", torch.float32) is None


# ------------------------------------------------------------------------------- sampling and log-probs
PROMPTS = [[1, 9, 17, 30, 41, 52, 8], [1, 23], [1, 60, 61, 70]]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_a_row_does_not_depend_on_the_rows_beside_it(name, tokenizer):
    """Left-padded batches (HyPO's online samples) draw what each prompt alone draws: greedily and from per-row
    seeds, with and without the KV cache. A family that mishandles left padding or the cache's positions fails."""
    model = _model(name, tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seeds = [row_seed(0, i) for i in range(len(PROMPTS))]
    for temperature in (0.0, 1.0):
        options = {"max_new_tokens": 6, "temperature": temperature, "eos_token_id": eos, "pad_token_id": pad}
        together = sample(model, PROMPTS, row_seeds=seeds, **options).completion_ids
        alone = [sample(model, [p], row_seeds=[s], **options).completion_ids[0]
                 for p, s in zip(PROMPTS, seeds, strict=True)]
        uncached = sample(model, PROMPTS, row_seeds=seeds, use_cache=False, **options).completion_ids
        assert together == alone == uncached, temperature


@pytest.mark.parametrize("name", list(FAMILIES))
def test_padded_log_probs_equal_each_sequence_scored_alone(name, tokenizer):
    model = _model(name, tokenizer)
    completions = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [9]]
    batch = pad_rows(PROMPTS, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        padded = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])[0]
        for i, (prompt, completion) in enumerate(zip(PROMPTS, completions, strict=True)):
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, :-1].float()
            alone = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)[len(prompt) - 1:].sum()
            assert float(padded[i]) == pytest.approx(float(alone), rel=1e-5, abs=1e-4), i
