"""Tiny Hugging Face causal language models built from a config: no download, seconds on a CPU.

The real loading path (``AutoModelForCausalLM.from_pretrained(model_id)``) is the same for a 7B model;
these tiny ones let the tests and the CPU notebooks run the genuine transformers code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TinyLMConfig", "disable_dropout", "find_dropout", "keep_4bit_trainable_on_cpu", "tiny_causal_lm",
           "with_lora"]

_DROPOUT_NAME = re.compile(r"dropout|pdrop")


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


def _dropout_fields(owner: Any, prefix: str, found: list[str], zero: bool) -> None:
    """The non-zero float fields named like ``*dropout*`` / ``*pdrop*`` of an object (set to 0 if ``zero``)."""
    for name, value in list(vars(owner).items()):
        if _DROPOUT_NAME.search(name) and isinstance(value, float) and value != 0.0:
            if zero:
                setattr(owner, name, 0.0)
            found.append(f"{prefix}{name}")


def _walk_dropout(model: Any, zero: bool) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != 0.0:
            if zero:
                module.p = 0.0
            found.append(f"{name or type(module).__name__}.p")
        _dropout_fields(module, prefix, found, zero)
    config = getattr(model, "config", None)
    configs = [("config.", config)] if config is not None else []
    for key, value in (vars(config).items() if config is not None else []):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # sub-configs (text_config, ...)
            configs.append((f"config.{key}.", value))
    for adapter, peft_config in (getattr(model, "peft_config", None) or {}).items():
        configs.append((f"peft_config[{adapter!r}].", peft_config))
    for prefix, owner in configs:
        _dropout_fields(owner, prefix, found, zero)
    return found


def find_dropout(model: Any) -> list[str]:
    """The names of every non-zero dropout of ``model`` (what ``disable_dropout`` would turn off)."""
    return _walk_dropout(model, zero=False)


def disable_dropout(model: Any) -> list[str]:
    """Turn every dropout of ``model`` off, so that train mode computes what eval mode computes.

    Preference losses compare the policy's log-probabilities with the reference's, and HyPO scores the
    samples it drew: with dropout active in the training forward only, ``pi == pi_ref`` no longer gives a zero
    margin or a zero KL, and the online KL estimate is biased. Covered:

    - ``nn.Dropout`` modules (and their 1-3d kinds), LoRA's ``lora_dropout`` included;
    - float attributes named ``*dropout*`` or ``*pdrop*`` on modules, which attention implementations pass to
      ``scaled_dot_product_attention`` (Llama/Phi ``attention_dropout``; OPT keeps every rate this way);
    - the same fields of ``model.config`` (and its sub-configs) and of a PEFT model's ``peft_config``, so a
      saved model says what was trained.

    Returns the names of what was changed (empty if there was no dropout). TRL's ``disable_dropout=True``
    does the first point only.
    """
    return _walk_dropout(model, zero=True)


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Keep a bitsandbytes 4-bit model's layers differentiable on a CPU; returns how many layers were changed.

    On a CPU with AVX512-BF16 (Intel Sapphire Rapids, AMD Zen 4, ...), bitsandbytes 0.50 repacks a
    ``Linear4bit`` weight into an inference-only layout the first time the layer runs in eval mode without
    gradients (as a reference pass or sampling does), and from then on multiplies with ``gemv_4bit``, which has
    no backward: no gradient flows through the layer's input any more, so every LoRA adapter below it gets a
    wrong gradient, silently (torch only warns). The same model on a CPU without AVX512-BF16 trains correctly.
    This turns the repacking off and undoes it where it has happened. A GPU is not affected; the cost on a CPU
    is the fused inference kernel's speed.
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        weight: Any = module.weight  # a bitsandbytes Params4bit
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            changed += 1
    return changed
