"""Tiny Hugging Face causal language models built from a config: no download, seconds on a CPU.

The real loading path (``AutoModelForCausalLM.from_pretrained(model_id)``) is the same for a 7B model;
these tiny ones let the tests and the CPU notebooks run the genuine transformers code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TinyLMConfig", "tiny_causal_lm", "with_lora"]


@dataclass(frozen=True)
class TinyLMConfig:
    """Shape of a tiny Llama-architecture model (about 0.1M parameters with these defaults)."""

    vocab_size: int = 64  # tokens; a locally trained tokenizer decides the real value
    hidden_size: int = 32  # width of the residual stream
    intermediate_size: int = 64  # MLP width
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Llama 3 / Mistral
    max_position_embeddings: int = 128  # longest prompt + completion


def tiny_causal_lm(config: TinyLMConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``LlamaForCausalLM`` of the given tiny shape, in eval mode.

    The same seed gives the same weights. ``attn_implementation="sdpa"``, as on a GPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy import, only when a model is built

    config = config or TinyLMConfig()
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # accepted by PreTrainedConfig at run time
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    return model.to(dtype).eval()  # type: ignore[arg-type]


def with_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
              target_modules: str | list[str] = "all-linear"):
    """``model`` wrapped in a new PEFT LoRA adapter (only the adapter trains).

    A new adapter starts as the identity (its B matrix is zero), so the wrapped model *is* the base model
    at first; ``rpo_lib.train`` then uses the base with the adapter disabled as ``pi_ref``, without a
    second copy in memory. ``"all-linear"`` adapts every linear layer except the output head (QLoRA's
    recommendation). For a 4-bit model, call ``peft.prepare_model_for_kbit_training`` first.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)
