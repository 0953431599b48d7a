"""rpo_lib.memory: the planner's sizes, its activation formula against autograd, its parts and advice, many GPUs."""

import pytest
import torch

from rpo_lib import memory
from rpo_lib.models import TinyLMConfig, load_policy


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
