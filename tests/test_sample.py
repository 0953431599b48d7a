"""rpo_lib.sample: the KV cache changes nothing, padding changes nothing, draws follow the model."""

import pytest
import torch

from rpo_lib.logprobs import completion_logprobs
from rpo_lib.sample import sample


def _prompts(tokenizer):
    return [tokenizer(p)["input_ids"] for p in ("fruit:", "animal tool:", "color:")]


def _sample(model, tokenizer, **kwargs):
    return sample(model, _prompts(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, **kwargs)


def test_kv_cache_gives_the_same_tokens_as_recomputing(reference):
    model, tokenizer = reference
    with_cache = _sample(model, tokenizer, k=4, max_new_tokens=12, generator=torch.Generator().manual_seed(3))
    without = _sample(model, tokenizer, k=4, max_new_tokens=12, generator=torch.Generator().manual_seed(3),
                      use_cache=False)
    assert with_cache.completion_ids == without.completion_ids
    assert torch.equal(with_cache.input_ids, without.input_ids)


def test_rows_layout_masks_and_grouping(reference):
    model, tokenizer = reference
    out = _sample(model, tokenizer, k=2, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    prompts = _prompts(tokenizer)
    assert out.input_ids.shape[0] == 6 and out.k == 2
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    for row in range(6):
        prompt, completion = prompts[row // 2], out.completion_ids[row]
        length = len(prompt) + len(completion)
        assert out.input_ids[row, :length].tolist() == list(prompt) + completion  # right-padded
        assert out.completion_mask[row].tolist() == [0] * len(prompt) + [1] * len(completion) + [0] * (
            out.input_ids.shape[1] - length)
        assert bool(out.finished[row]) == (completion[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in completion[:-1]


def test_first_token_frequencies_follow_the_model_despite_left_padding(reference):
    model, tokenizer = reference
    prompts = _prompts(tokenizer)
    n = 3000
    out = sample(model, prompts, k=n, max_new_tokens=1, generator=torch.Generator().manual_seed(1),
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for i, prompt in enumerate(prompts):  # each prompt alone, unpadded
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)
        drawn = torch.tensor([ids[0] for ids in out.completion_ids[i * n:(i + 1) * n]])
        freq = torch.bincount(drawn, minlength=probs.numel()).float() / n
        se = (probs * (1 - probs) / n).sqrt()
        assert bool(((freq - probs).abs() <= 5 * se + 1e-3).all())


def test_greedy_is_deterministic_and_matches_argmax(reference):
    model, tokenizer = reference
    a = _sample(model, tokenizer, k=1, max_new_tokens=8, temperature=0)
    b = _sample(model, tokenizer, k=1, max_new_tokens=8, temperature=0)
    assert a.completion_ids == b.completion_ids
    ids = list(_prompts(tokenizer)[1])
    for token in a.completion_ids[1]:
        with torch.no_grad():
            assert int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
        ids.append(token)


def test_rows_score_with_completion_logprobs(reference):
    model, tokenizer = reference
    out = _sample(model, tokenizer, k=2, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logps, _, mask = completion_logprobs(model, out.input_ids, out.attention_mask, out.completion_mask)
    assert logps.shape == (6,) and bool((logps < 0).all())
    assert mask.sum(dim=1).tolist() == [len(c) for c in out.completion_ids]


def test_restores_training_mode_and_checks_arguments(reference):
    model, tokenizer = reference
    model.train()
    _sample(model, tokenizer, k=1, max_new_tokens=2)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="k and max_new_tokens"):
        _sample(model, tokenizer, k=0)
    with pytest.raises(ValueError, match="temperature"):
        _sample(model, tokenizer, temperature=-1)
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[]], eos_token_id=2, pad_token_id=0)


def test_loops_of_at_most_max_rows_give_the_same_greedy_rows(reference):
    model, tokenizer = reference
    whole = _sample(model, tokenizer, k=3, max_new_tokens=10, temperature=0)
    for max_rows in (1, 4, 9):
        chunked = _sample(model, tokenizer, k=3, max_new_tokens=10, temperature=0, max_rows=max_rows)
        assert chunked.completion_ids == whole.completion_ids
        assert torch.equal(chunked.input_ids, whole.input_ids)
        assert chunked.row_lengths == whole.row_lengths == whole.attention_mask.sum(1).tolist()


def test_prefill_keeps_only_the_last_positions_logits(reference):
    model, tokenizer = reference
    seen = []

    def spy(module, args, kwargs, output):
        seen.append((kwargs.get("logits_to_keep"), kwargs["input_ids"].shape, tuple(output.logits.shape)))

    handle = model.register_forward_hook(spy, with_kwargs=True)
    try:
        _sample(model, tokenizer, k=2, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    keep, ids_shape, logits_shape = seen[0]  # the prefill: the whole left-padded prompts
    assert keep == 1 and ids_shape[1] > 1 and logits_shape == (6, 1, len(tokenizer))
    assert all(shape[1] == 1 for _, _, shape in seen)  # no (N, T, V) logits at any step


def test_samples_rows_slices_prompts_without_reading_the_device(reference):
    model, tokenizer = reference
    out = _sample(model, tokenizer, k=2, max_new_tokens=12, generator=torch.Generator().manual_seed(5))
    part = out.rows(1, 3)
    assert part.prompt_index.tolist() == [0, 0, 1, 1] and part.completion_ids == out.completion_ids[2:]
    width = max(out.row_lengths[2:])
    assert part.input_ids.shape == (4, width) and torch.equal(part.input_ids, out.input_ids[2:, :width])


def test_kv_cache_size_of_a_7b_model():
    """Mistral-7B's shape (32 layers, 8 key-value heads of 128) in bf16: 128 rows of 768 tokens ~ 12.9 GB."""
    from types import SimpleNamespace

    from transformers import MistralConfig

    from rpo_lib.sample import kv_cache_bytes, rows_that_fit

    model = SimpleNamespace(config=MistralConfig(dtype=torch.bfloat16))
    assert kv_cache_bytes(model, 128, 768) == 2 * 32 * 8 * 128 * 768 * 128 * 2 == pytest.approx(12.9e9, rel=0.01)
    assert rows_that_fit(model, 768, 40e9) == int(40e9 // (2 * 32 * 8 * 128 * 768 * 2)) == 397
    assert rows_that_fit(model, 768, 1.0) == 1


def test_row_seeds_make_a_rows_sample_independent_of_its_neighbours_and_of_max_rows():
    """What lets N processes draw HyPO's samples of one global batch: a row's draw depends on its seed only."""
    from rpo_lib.models import tiny_causal_lm
    from rpo_lib.sample import row_seed, sample

    model = tiny_causal_lm(seed=3)
    prompts = [[1, 5, 7], [1, 9], [1, 4, 4, 6], [1, 8]]
    seeds = [row_seed(0, 0, i, j) for i in range(4) for j in range(2)]
    options = {"k": 2, "max_new_tokens": 12, "eos_token_id": 2, "pad_token_id": 0}
    whole = sample(model, prompts, row_seeds=seeds, **options)
    halves = [sample(model, prompts[:2], row_seeds=seeds[:4], **options),
              sample(model, prompts[2:], row_seeds=seeds[4:], max_rows=3, **options)]
    assert whole.completion_ids == halves[0].completion_ids + halves[1].completion_ids
    other = sample(model, prompts, row_seeds=[row_seed(1, 0, i, j) for i in range(4) for j in range(2)], **options)
    assert other.completion_ids != whole.completion_ids
    with pytest.raises(ValueError, match="one seed per row"):
        sample(model, prompts, row_seeds=seeds[:3], **options)


def test_inverse_cdf_draws_follow_the_softmax():
    """Row-seeded draws are exact draws of the softmax: frequencies of 40,000 draws within 4 standard errors."""
    from rpo_lib.sample import _next_token, _row_uniforms, row_seed

    logits = torch.tensor([[2.0, 0.1, -1.5, 1.0, -0.5]])
    probs = torch.softmax(logits, dim=-1)[0]
    n = 40_000
    tokens = _next_token(logits.expand(n, 5), 1.0, None, _row_uniforms([row_seed(7, i) for i in range(n)], 1)[:, 0])
    frequencies = torch.bincount(tokens, minlength=5).double() / n
    tolerance = 4 * torch.sqrt(probs.double() * (1 - probs.double()) / n)
    assert torch.all((frequencies - probs.double()).abs() < tolerance), (frequencies, probs)


def test_kv_cache_is_counted_in_the_compute_dtype_of_float32_master_weights():
    """Full fine-tuning keeps float32 weights and computes in bf16 (rpo_lib.models.load_policy): the cache is bf16."""
    from rpo_lib.models import COMPUTE_DTYPE_ATTRIBUTE, TinyLMConfig, tiny_causal_lm
    from rpo_lib.sample import kv_cache_bytes

    model = tiny_causal_lm(TinyLMConfig())
    float32 = kv_cache_bytes(model, 4, 10)
    setattr(model, COMPUTE_DTYPE_ATTRIBUTE, torch.bfloat16)
    assert kv_cache_bytes(model, 4, 10) * 2 == float32
