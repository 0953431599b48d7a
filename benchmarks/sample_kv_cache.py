"""Sampling speed of rpo_lib.sample with and without the KV cache (what HyPO pays per step for its samples).

    python benchmarks/sample_kv_cache.py            # CPU here; on a GPU machine it uses CUDA

Two models: the shipped 94k-parameter reference of data/gold_task, and a wider random Llama (4 layers, width 256)
whose prompts are longer, where recomputing the whole sequence at every step costs more. Prints generated tokens
per second and writes the figures to sample_kv_cache.json beside this script.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rpo_lib.env import device  # noqa: E402
from rpo_lib.models import TinyLMConfig, tiny_causal_lm  # noqa: E402
from rpo_lib.sample import sample  # noqa: E402
from rpo_lib.tasks import TopicTask, load_reference  # noqa: E402


def tokens_per_second(model, prompts, *, use_cache: bool, k: int, max_new_tokens: int, repeats: int = 3) -> float:
    best = float("inf")
    generated = 0
    for _ in range(repeats):
        start = time.perf_counter()
        out = sample(model, prompts, k=k, max_new_tokens=max_new_tokens, temperature=1.0, eos_token_id=-1,
                     pad_token_id=0, generator=torch.Generator().manual_seed(0), use_cache=use_cache)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        generated = sum(len(c) for c in out.completion_ids)
    return generated / best


def main() -> None:
    target = device()
    reference, tokenizer = load_reference()
    wide = tiny_causal_lm(TinyLMConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512))
    cases = {
        "reference (94k params), 10 prompts x 16, 32 new tokens": (
            reference, [tokenizer(p)["input_ids"] for p in TopicTask().prompts], 16, 32),
        "wide (4 layers, width 256), 8 prompts of 128 tokens x 4, 128 new tokens": (
            wide, [list(range(1, 129))] * 8, 4, 128),
    }
    results = {}
    for name, (model, prompts, k, new) in cases.items():
        model = model.to(target)
        # eos_token_id=-1: no row stops early, so both paths generate exactly the same number of tokens
        cached = tokens_per_second(model, prompts, use_cache=True, k=k, max_new_tokens=new)
        recomputed = tokens_per_second(model, prompts, use_cache=False, k=k, max_new_tokens=new)
        results[name] = {"device": str(target), "kv_cache_tokens_per_s": round(cached),
                         "recompute_tokens_per_s": round(recomputed), "speed_up": round(cached / recomputed, 2)}
        print(f"{name}: {cached:,.0f} tok/s with the KV cache, {recomputed:,.0f} without ({cached / recomputed:.1f}x)")
    out = Path(__file__).resolve().with_suffix(".json")
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
