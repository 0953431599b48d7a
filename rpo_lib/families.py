"""Tiny random models of the decoder families ``rpo_lib`` is checked on, built from a config with no download.

Each family is what a user of TRL or torchrun would bring: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Gemma-3,
Phi-3, Cohere, GPT-2, GPT-NeoX, OPT and Falcon (and Falcon with ALiBi, which packing refuses). The configs are tiny
(2 layers, width 32) but keep what makes a family differ: sliding windows shorter than a sequence (Mistral,
Qwen2 on one of its two layers, Gemma-2/3, Phi-3), Gemma-2's final logit soft-capping, Cohere's logit scale,
learned absolute positions (GPT-2, OPT), partial rotary embeddings (GPT-NeoX), parallel attention (Falcon). The
output head is scaled up (``logit_gain``) so that logits are large enough for soft-capping to matter.

``tests/test_families.py`` runs one training step of each, padded against packed, and the sampler and the padded
log-probs on each; ``benchmarks/gpu_check.py`` repeats the packed-vs-padded comparison in bf16 on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FAMILIES", "Family", "tiny_family_model"]


@dataclass(frozen=True)
class Family:
    """A decoder family: its transformers ``model_type``, the config changes that make it tiny (and keep what is
    particular to it), the attention implementation it runs (``"sdpa"`` unless transformers has none for it), and
    how packed rows fare under each ``packing_attention``: ``"exact"`` or ``"refused"``."""

    model_type: str
    settings: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    packing: dict[str, str] = field(default_factory=lambda: {"mask": "exact", "varlen": "exact"})
    what: str = ""


_WINDOW = 5  # shorter than every test sequence, so a dropped window shows
_COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False}
_VARLEN_REFUSED = {"mask": "exact", "varlen": "refused"}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", what="rotary positions, grouped-query attention"),
    "mistral": Family("mistral", {"sliding_window": _WINDOW}, what="a sliding window on every layer"),
    "qwen2": Family("qwen2", {"use_sliding_window": True, "sliding_window": _WINDOW, "max_window_layers": 1},
                    what="a sliding window on one layer of two, attention biases"),
    "qwen3": Family("qwen3", {"head_dim": 8}, what="query and key norms"),
    "gemma": Family("gemma", {"head_dim": 8}, what="scaled embeddings, (1 + w) RMSNorm"),
    "gemma2": Family("gemma2", {"head_dim": 8, "sliding_window": _WINDOW, "final_logit_softcapping": 5.0},
                     attn_implementation="eager",
                     what="final logit soft-capping, attention soft-capping, alternating sliding windows"),
    "gemma3": Family("gemma3_text", {"head_dim": 8, "sliding_window": _WINDOW},
                     what="alternating sliding windows with their own rotary base"),
    "phi3": Family("phi3", {"sliding_window": _WINDOW}, what="fused projections, a sliding window"),
    "cohere": Family("cohere", {"logit_scale": 0.5}, what="a logit scale, parallel attention and MLP"),
    "gpt2": Family("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512, "tie_word_embeddings": True},
                   what="learned absolute positions, Conv1D layers, a tied head"),
    "gpt_neox": Family("gpt_neox", {"rotary_pct": 0.5}, what="partial rotary embeddings, parallel residual"),
    "opt": Family("opt", {"ffn_dim": 64, "word_embed_proj_dim": 32}, packing=_VARLEN_REFUSED,
                  what="learned positions with an offset; its mask ignores position_ids"),
    "falcon": Family("falcon", {"num_kv_heads": 2, "new_decoder_architecture": True, "alibi": False},
                     packing=_VARLEN_REFUSED, what="parallel attention, rotary; its mask ignores position_ids"),
    "falcon_alibi": Family("falcon", {"num_kv_heads": 2, "alibi": True},
                           packing={"mask": "refused", "varlen": "refused"},
                           what="ALiBi position biases over the whole row"),
}


def tiny_family_model(name: str, *, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                      logit_gain: float = 30.0, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                      attn_implementation: str | None = None) -> Any:
    """A random model of family ``name`` (a key of ``FAMILIES``) with ``vocab_size`` tokens, in eval mode.

    The same seed gives the same weights. The output head is multiplied by ``logit_gain`` (logits of size 10-100:
    Gemma-2's soft-capping at 5 then changes them). ``attn_implementation`` overrides the family's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"no family {name!r}; the families are {sorted(FAMILIES)}.")
    family = FAMILIES[name]
    config = AutoConfig.for_model(family.model_type, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                  bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                  **{**_COMMON, **family.settings})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation or
                                                 family.attn_implementation)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_gain)
    return model.to(dtype).eval()
