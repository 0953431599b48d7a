"""rpo_lib.models: load_policy (4-bit weights, LoRA, an SFT adapter as the reference) on a tiny hub-style model."""

import pytest
import torch

from rpo_lib.data import load_preferences, sample_file
from rpo_lib.models import REF_ADAPTER, LoraSettings, load_policy, with_lora
from rpo_lib.train import Trainer, preset


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
