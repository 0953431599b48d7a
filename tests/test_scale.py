"""One GPU at scale, tested on a CPU: load_policy, the memory planner, dataset schemas, padding-free training."""

import copy
import json

import pytest
import torch

from rpo_lib import memory
from rpo_lib.data import (SCHEMAS, load_preferences, parse_hh, sample_file, tokenize_dataset, tokenize_preferences)
from rpo_lib.models import REF_ADAPTER, LoraSettings, TinyLMConfig, load_policy, tiny_checkpoint, with_lora
from rpo_lib.train import Trainer, preset


def _sample_texts():
    texts = []
    for name in SCHEMAS:
        for row in load_preferences(sample_file(name)):
            for key in ("prompt", "chosen", "rejected"):
                value = row[key]
                texts.append(value if isinstance(value, str) else " ".join(m["content"] for m in value))
    return texts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model directory as the hub has them, with a tokenizer trained on the sample files."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", _sample_texts())


# ------------------------------------------------------------------------------------------------ data
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


# ---------------------------------------------------------------------------------------------- models
def test_load_policy_nf4_freezes_the_base_and_trains_lora(checkpoint):
    model, tokenizer = load_policy(checkpoint, quantization="nf4", lora=LoraSettings(r=4))
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # embeddings and head keep their dtype (no float32 upcast of frozen weights)
    assert model.get_base_model().lm_head.weight.dtype == torch.float32  # CPU default dtype
    ids = torch.tensor([tokenizer("why is the sky blue")["input_ids"]])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # B starts at zero, so only B has a gradient at the first step (A's gradient is B^T times something)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_load_policy_refuses_to_train_quantised_weights_in_full(checkpoint):
    with pytest.raises(ValueError, match="give lora=LoraSettings"):
        load_policy(checkpoint, quantization="nf4", lora=None)


def test_missing_model_says_what_to_give(tmp_path):
    with pytest.raises(OSError, match="local directory with config.json"):
        load_policy(tmp_path / "nothing", quantization=None)


def test_sft_adapter_is_the_reference_and_the_start(checkpoint, tmp_path):
    """load_policy(sft_adapter=...) trains from the SFT adapter and scores pi_ref with a frozen copy of it."""
    base, tokenizer = load_policy(checkpoint, quantization=None, lora=None, gradient_checkpointing=False)
    sft = with_lora(base, r=4)
    with torch.no_grad():  # an SFT adapter that changes the model
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    sft.save_pretrained(tmp_path / "sft")
    rows = list(load_preferences(sample_file("preference")))
    model, tokenizer = load_policy(checkpoint, quantization=None, sft_adapter=tmp_path / "sft",
                                   gradient_checkpointing=False)
    assert set(model.peft_config) == {"default", REF_ADAPTER}
    config = preset("tiny", method="dpo", max_steps=1, batch_size=4, max_length=96, progress=False)
    trainer = Trainer(model, tokenizer, rows, config)
    assert trainer.ref_adapter_name == REF_ADAPTER
    loss, metrics = trainer.batch_loss(range(4))
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy = SFT adapter = reference
    assert loss.item() == pytest.approx(0.6931, abs=1e-3)
    batch = trainer.collate(trainer.examples[:4])
    with model.disable_adapter():
        base_logps = trainer._forward(model, trainer._to_device(batch))[0]
    assert (trainer.logprobs(batch, reference=True) - base_logps).abs().max() > 1e-3  # not the bare base
    trainer.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(REF_ADAPTER in name for name in trainable)  # the reference stayed frozen


# ---------------------------------------------------------------------------------- full fine-tuning
def _moved_share(checkpoint, master_dtype):
    """Share of the weights that one DPO step at lr 5e-7 changes at all, full fine-tuning with bf16 compute."""
    model, tokenizer = load_policy(checkpoint, quantization=None, lora=None, dtype=torch.bfloat16,
                                   master_dtype=master_dtype, gradient_checkpointing=False, device="cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = preset("tiny", method="dpo", learning_rate=5e-7, warmup_steps=0, lr_schedule="constant", batch_size=8,
                    max_length=96, max_grad_norm=None, progress=False)
    trainer = Trainer(model, tokenizer, list(load_preferences(sample_file("ultrafeedback"))), config)
    trainer._optimizer_step(0)
    moved = sum(int((p.detach() != before[name]).sum()) for name, p in trainer.model.named_parameters())
    return moved / sum(p.numel() for p in before.values()), trainer


def test_full_fine_tuning_keeps_float32_master_weights_so_small_steps_move_them(checkpoint):
    """A DPO-sized step (lr 5e-7, the papers' full fine-tuning rate): AdamW moves each weight by about 5e-7, far
    below bf16's resolution (1/256 of a weight of size 0.02: 8e-5) but far above float32's (2e-9). load_policy's
    default for full fine-tuning keeps float32 master weights and computes in bf16 under autocast: nearly every
    weight moves. bf16 weights (master_dtype=bfloat16, what load_policy did before) lose almost every update
    (measured on a GPU: 0.8% against 84.8%)."""
    share, trainer = _moved_share(checkpoint, None)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.compute_dtype == torch.bfloat16 and trainer._autocast
    share_bf16, _ = _moved_share(checkpoint, torch.bfloat16)
    assert share > 0.5 and share_bf16 < 0.05, (share, share_bf16)


def test_the_reference_copy_stores_linear_layers_in_the_compute_dtype_and_scores_the_same(checkpoint):
    """Full fine-tuning's frozen reference: its linear layers in bf16 (autocast casts them anyway), the rest as
    the policy's; before the first step it scores every pair as the policy does."""
    model, tokenizer = load_policy(checkpoint, quantization=None, lora=None, dtype=torch.bfloat16,
                                   gradient_checkpointing=False, device="cpu")
    config = preset("tiny", method="dpo", batch_size=8, max_length=96, progress=False)
    trainer = Trainer(model, tokenizer, list(load_preferences(sample_file("ultrafeedback"))), config)
    reference = trainer.ref_model
    linear = [m.weight for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(w.dtype == torch.bfloat16 for w in linear)
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    batch = trainer.collate(trainer.examples[:8])
    torch.testing.assert_close(trainer.logprobs(batch, reference=True), trainer.logprobs(batch), rtol=0, atol=1e-5)
    held = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert held < 0.8 * sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    plan = memory.plan_memory(model.config, lora_r=None, quantization=None, max_length=96, pairs=8)
    assert plan.parts["reference copy"] == held  # the planner counts the copy the trainer makes, to the byte


# ------------------------------------------------------------------------------------- padding-free
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


def test_length_grouped_batches_cover_every_pair_once_and_pad_less(reference, pairs):
    model, tokenizer = reference
    config = preset("tiny", method="dpo", batch_size=8, progress=False, group_by_length=True)
    grouped = Trainer(model, tokenizer, pairs, config)
    plain = Trainer(model, tokenizer, pairs, preset("tiny", method="dpo", batch_size=8, progress=False))
    steps = len(pairs) // 8
    for trainer in (grouped, plain):
        seen = sorted(i for step in range(steps) for i in trainer._batch_indices(step))
        assert seen == list(range(len(pairs)))

    def padding(trainer):
        total = 0
        for step in range(steps):
            lengths = [len(trainer.examples[i].prompt_ids) + len(trainer.examples[i].chosen_ids)
                       for i in trainer._batch_indices(step)]
            total += max(lengths) * len(lengths) - sum(lengths)
        return total
    assert padding(grouped) < padding(plain)


# ---------------------------------------------------------------------------------------------- memory
def test_known_shapes_have_their_published_sizes():
    assert memory.SHAPES["mistral-7b"].parameters() == 7_241_732_096  # Mistral-7B-v0.1
    assert memory.SHAPES["llama-3-8b"].parameters() == 8_030_261_248  # Meta-Llama-3-8B
    assert memory.SHAPES["mistral-7b"].lora_parameters(16) == 41_943_040  # peft's count, r=16 on all linear


@pytest.mark.parametrize("autocast", [True, False])
def test_activation_formula_matches_what_autograd_keeps(autocast, tmp_path):
    """A shape the formula was not fitted on: width 192, MLP 640, 6 heads of 32, 3 key-value heads, LoRA r=8."""
    shape = TinyLMConfig(vocab_size=64, hidden_size=192, intermediate_size=640, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512)
    from rpo_lib.models import tiny_causal_lm

    measured = {}
    for layers in (1, 2):
        config = TinyLMConfig(**{**shape.__dict__, "num_hidden_layers": layers})
        tiny_causal_lm(config).to(torch.bfloat16).save_pretrained(tmp_path / f"m{layers}")
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tmp_path / f"m{layers}", dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear")).train()
        for tokens in (128, 256):  # the difference leaves out what does not grow with tokens (weight casts)
            ids = torch.randint(3, 64, (1, tokens), generator=torch.Generator().manual_seed(0))
            measured[layers, tokens] = memory.saved_activation_bytes(
                model, ids, autocast_dtype=torch.bfloat16 if autocast else None)
    per_layer = ((measured[2, 256] - measured[2, 128]) - (measured[1, 256] - measured[1, 128])) / 128
    predicted = memory.activation_bytes_per_token(memory.ModelShape.from_config(base.config), lora_r=8,
                                                  autocast=autocast)
    assert per_layer == pytest.approx(predicted, rel=0.02)


def test_plan_parts_and_advice():
    plan = memory.plan_memory("mistral-7b", max_length=1024, pairs=2)
    weights = plan.parts["weights"] / 2**30
    assert 3.5 < weights < 4.2  # 6.98e9 linear weights at ~0.52 bytes, 0.26e9 others at 2 bytes
    assert plan.parts["LoRA + AdamW state"] == 41_943_040 * 16
    assert plan.fits(80) and plan.fits(16)
    no_ckpt = memory.replace(plan, gradient_checkpointing=False)
    assert no_ckpt.parts["activations"] > 10 * plan.parts["activations"]
    full_logits = memory.replace(plan, logits="full")
    assert full_logits.parts["logits"] == pytest.approx(4096 * 32000 * 10, rel=1e-9)
    advice = no_ckpt.advice(16)
    assert advice and memory.replace(no_ckpt, **advice).fits(16)
    assert "gradient_checkpointing" in advice
    full = memory.replace(plan, quantization=None, lora_r=None)  # full fine-tuning: 16 bytes x 7.2B + a copy
    advice = full.advice(16)
    assert not full.fits(40) and advice["lora_r"] == 16 and advice["quantization"] == "nf4"
    assert memory.replace(full, **advice).fits(16)
    hypo = memory.replace(plan, method="hypo")
    assert hypo.parts["HyPO KV cache"] == 2 * 2 * (512 + 128) * 2 * 32 * 8 * 128 * 2
    assert "16 GB GPU" in str(plan)


def test_planner_reads_a_transformers_config(checkpoint):
    from transformers import AutoConfig

    shape = memory.ModelShape.from_config(AutoConfig.from_pretrained(checkpoint))
    model, _ = load_policy(checkpoint, quantization=None, lora=None, gradient_checkpointing=False)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())


def test_sample_files_are_what_the_script_writes():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sample_data.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_tiny_reward_model_is_tiny_and_scores(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from rpo_lib.evaluation import load_reward_model, reward_scores, tiny_reward_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reward = load_reward_model(tiny_reward_checkpoint(tmp_path / "reward", tokenizer), device="cpu")
    assert sum(p.numel() for p in reward.model.parameters()) < 100_000
    scores = reward_scores(reward, ["why is the sky blue", "a prime number"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_the_margin_is_on_what_varies_and_full_fine_tuning_counts_what_the_trainer_holds():
    """ALLOCATOR_SLACK is added to the largest phase only, not to the weights. Full fine-tuning holds float32 master
    weights, float32 gradients and two float32 AdamW moments (16 bytes per parameter), and the frozen reference
    copy (linear layers in bf16, the rest in float32) unless the reference log-probs are precomputed."""
    from rpo_lib.memory import ALLOCATOR_SLACK, SHAPES, GiB

    plan = memory.plan_memory("mistral-7b", max_length=1024, pairs=2)
    fixed = plan.parts["weights"] + plan.parts["LoRA + AdamW state"]
    assert plan.fixed_bytes == fixed
    assert plan.total_bytes == pytest.approx(fixed + max(plan.phase_bytes.values()) * (1 + ALLOCATOR_SLACK))
    shape = SHAPES["mistral-7b"]
    full = memory.plan_memory(shape, lora_r=None, quantization=None, max_length=1024, pairs=1)
    assert full.parts["weights"] + full.parts["gradients + AdamW state"] == 16 * shape.parameters()
    head = shape.vocab_size * shape.hidden_size  # Mistral's head is untied: an nn.Linear, stored in bf16 too
    copy_bytes = 2 * (shape.linear_parameters() + head) + 4 * (shape.other_parameters() - head)
    assert full.parts["reference copy"] == copy_bytes and 13.5 < copy_bytes / GiB < 14.5
    precomputed = memory.replace(full, precompute_ref=True)
    assert "reference copy" not in precomputed.parts and "reference pass" not in precomputed.parts
    assert "reference copy" in memory.replace(precomputed, method="hypo").parts  # HyPO scores its samples under it
    bf16 = memory.replace(full, master_bytes=2)
    assert bf16.parts["weights"] + bf16.parts["gradients + AdamW state"] == 8 * shape.parameters()
    packed = memory.replace(plan, real_tokens=3000, completion_tokens=1000)
    assert packed.parts["logits"] < memory.replace(plan, real_tokens=3000).parts["logits"]


def test_plan_per_gpu_with_ddp_and_fsdp():
    """Several GPUs: DDP adds its gradient buckets to the one-GPU plan; FSDP divides the layers' weights and the
    trainable state by the GPU count and adds two gathered layers. Mistral-7B, NF4, LoRA r=16."""
    from rpo_lib.memory import NF4_BYTES, SHAPES  # noqa: I001

    one = memory.plan_memory("mistral-7b", max_length=1024, pairs=2)
    assert memory.plan_memory("mistral-7b", max_length=1024, pairs=2, num_gpus=1, strategy="fsdp").parts == one.parts
    ddp = memory.plan_memory("mistral-7b", max_length=1024, pairs=2, num_gpus=4, strategy="ddp")
    assert ddp.parts["DDP gradient buckets"] == 41_943_040 * 4  # LoRA r=16's float32 gradients
    assert {k: v for k, v in ddp.parts.items() if k != "DDP gradient buckets"} == one.parts
    fsdp = memory.plan_memory("mistral-7b", max_length=1024, pairs=2, num_gpus=4, strategy="fsdp")
    linear = SHAPES["mistral-7b"].linear_parameters() * NF4_BYTES
    assert fsdp.parts["weights"] == pytest.approx(one.parts["weights"] - 0.75 * linear)
    assert fsdp.parts["LoRA + AdamW state"] == one.parts["LoRA + AdamW state"] / 4
    assert fsdp.parts["FSDP gathered layers"] == pytest.approx(2 * (linear + 41_943_040 * 4) / 32)
    assert fsdp.parts["activations"] == one.parts["activations"]  # per micro-batch, whatever the GPU count
    assert fsdp.total_gib < one.total_gib < ddp.total_gib
    assert "per GPU, 4 GPUs with FSDP" in fsdp.table()
    int8 = memory.plan_memory("mistral-7b", max_length=1024, pairs=2, quantization="int8", num_gpus=4,
                              strategy="fsdp")
    int8_one = memory.plan_memory("mistral-7b", max_length=1024, pairs=2, quantization="int8")
    assert int8.parts["weights"] == int8_one.parts["weights"]  # 8-bit weights stay whole under FSDP
    assert int8.parts["FSDP gathered layers"] == pytest.approx(2 * 41_943_040 * 4 / 32)  # only the adapters
    with pytest.raises(ValueError, match="strategy"):
        memory.plan_memory("mistral-7b", num_gpus=2, strategy="zero3")
