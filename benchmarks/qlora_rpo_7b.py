"""QLoRA RPO on a 7B-shaped model: rpo_lib against TRL 1.16 on the same data, in the same process.

    python benchmarks/qlora_rpo_7b.py            # a GPU: Mistral-7B and Llama-3-8B shapes (random weights)
    python benchmarks/qlora_rpo_7b.py --smoke    # any machine: tiny shapes, 2 steps, the same code (make test)

Random weights (the hub is not needed): losses mean nothing, time and memory are real. Both sides load the model
through the same path (``rpo_lib.models.load_policy``'s NF4 double-quant, bf16 compute, LoRA r=16 alpha=32 on
every linear layer, sdpa, gradient checkpointing), RPO with beta=0.1 and a token-mean SFT term of weight 1 (TRL:
``loss_type=["sigmoid", "sft"]``). Settings:

- (a) fixed: 2 pairs per step, prompt 512 + completion 512 tokens;
- (b) variable: lengths like UltraFeedback's (prompt median ~120, answers ~250, a long tail to 1,024), 4 pairs a step;
- (c) long: one pair at 4,096 tokens per sequence;
  each with the reference computed in the step and precomputed (TRL's precompute pass counted in its time);
- (d) HyPO: rpo_lib's step with k=2 online samples of 128 new tokens, against its RPO step (TRL has no HyPO).

Throughput is real (non-pad) tokens per second over the whole run after a warm-up run, chosen and rejected counted;
the peak is ``torch.cuda.max_memory_allocated``, beside the planner's prediction (``rpo_lib.memory``), whole and
by part (what stays, and the largest phase). Each side loads the model once for all its runs, and the two sides
are never in memory together, so each peak is its own. Prints a table and writes ``qlora_rpo_7b.json``
(``--smoke``: ``qlora_rpo_7b-smoke.json``) beside this script. Nothing here is asserted about speed:
``tests/test_benchmarks.py`` runs the smoke mode and checks what it writes; ``benchmarks/gpu_check.py`` runs it
on the Mistral-7B shape as part of the one GPU check.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rpo_lib import memory  # noqa: E402
from rpo_lib.models import LoraSettings, TinyLMConfig, load_policy, tiny_causal_lm, tiny_checkpoint  # noqa: E402
from rpo_lib.train import Trainer, preset  # noqa: E402

HERE = Path(__file__).resolve().parent
WORDS = [f"w{i}" for i in range(400)]  # each a single token of the benchmark's tokenizer


def settings(smoke: bool) -> dict[str, dict]:
    scale = 16 if smoke else 1  # smoke: lengths / 16
    return {
        "a_fixed": {"pairs": 2, "prompt": 512 // scale, "answer": (512 // scale, 512 // scale), "steps": 8},
        "b_variable": {"pairs": 4, "prompt": "ultrafeedback", "answer": "ultrafeedback", "steps": 8},
        "c_long": {"pairs": 1, "prompt": 2048 // scale, "answer": (2048 // scale, 2048 // scale), "steps": 4},
    }


def lengths_like_ultrafeedback(rng: random.Random, scale: int) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) tokens: log-normal prompt (median 120), answers ~250, tail cut at 1,024 total."""
    prompt = int(min(700, rng.lognormvariate(4.79, 0.8)))
    chosen, rejected = (int(min(900, rng.lognormvariate(5.5, 0.5))) for _ in range(2))
    room = 1024 - prompt
    return max(1, prompt // scale), max(1, min(chosen, room) // scale), max(1, min(rejected, room) // scale)


def make_rows(setting: dict, n_pairs: int, seed: int, scale: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        if setting["prompt"] == "ultrafeedback":
            p, c, r = lengths_like_ultrafeedback(rng, scale)
        else:
            p, (c, r) = setting["prompt"], setting["answer"]
        words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
        rows.append({"prompt": words(p - 1), "chosen": " " + words(c - 1), "rejected": " " + words(r - 1)})
    return rows


def sequence_lengths(tokenizer, rows: list[dict]) -> list[int]:
    """Tokens of every prompt + chosen and prompt + rejected sequence, the EOS that ends it included."""
    return [len(tokenizer(row["prompt"] + row[key])["input_ids"]) + 1 for row in rows for key in ("chosen", "rejected")]


def real_tokens(tokenizer, rows: list[dict]) -> int:
    return sum(sequence_lengths(tokenizer, rows))


def build_checkpoint(shape: str, directory: Path, smoke: bool) -> str:
    """A model directory of the given shape with random weights and a tokenizer whose words are single tokens."""
    path = tiny_checkpoint(directory / "tiny", [" ".join(WORDS)] * 4, vocab_size=512)
    if smoke:
        return path
    from transformers import AutoConfig

    known = memory.SHAPES[shape]
    config = TinyLMConfig(vocab_size=known.vocab_size, hidden_size=known.hidden_size,
                          intermediate_size=known.intermediate_size, num_hidden_layers=known.num_hidden_layers,
                          num_attention_heads=known.num_attention_heads,
                          num_key_value_heads=known.num_key_value_heads, max_position_embeddings=8192)
    with torch.device("cuda"):
        model = tiny_causal_lm(config, dtype=torch.bfloat16)
    out = directory / shape
    model.save_pretrained(out, safe_serialization=True)
    del model
    for name in os.listdir(path):
        if name.startswith(("tokenizer", "chat_template")):
            (out / name).write_bytes((Path(path) / name).read_bytes())
    assert AutoConfig.from_pretrained(out).vocab_size == known.vocab_size
    return str(out)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def load_ours(path: str, smoke: bool) -> tuple:
    """rpo_lib's model, loaded once for every run of a shape (the adapter trains on from run to run: random weights,
    the figures are time and memory)."""
    return load_policy(path, quantization="nf4", lora=LoraSettings(r=16, alpha=32),
                       dtype=None if smoke else torch.bfloat16)


def run_ours(model, tokenizer, rows: list[dict], setting: dict, *, precompute: bool, method: str = "rpo",
             smoke: bool) -> dict:
    max_length = max(sequence_lengths(tokenizer, rows))
    config = preset("qlora_7b", method=method, beta=0.1, eta=None, sft_weight=1.0, rpo_variant="trl",
                    batch_size=setting["pairs"], micro_batch_size=setting["pairs"], max_length=max_length,
                    max_prompt_length=None, max_steps=setting["steps"], warmup_steps=0, padding_free=True,
                    precompute_ref_logps=precompute, progress=False, save_every=0, online_max_new_tokens=128
                    if not smoke else 8, k_online=2, lam=1e-4)
    warm = Trainer(model, tokenizer, rows[:setting["pairs"]], dataclasses.replace(config, max_steps=1))
    warm.train()  # kernels, allocator, autotuning
    del warm
    _reset_peak()
    _sync()
    held_before = _allocated()
    start = time.perf_counter()
    trainer = Trainer(model, tokenizer, rows, config)
    trainer.train()
    _sync()
    seconds = time.perf_counter() - start
    held_after = _allocated()  # the trainer's optimizer state is still alive
    del trainer
    return {"seconds": seconds, "peak_gib": _peak_gib(), "tokens": real_tokens(tokenizer, rows),
            "steps": setting["steps"], "max_length": max_length, "held_before_gib": held_before,
            "held_after_gib": held_after, **_micro_batch_tokens(tokenizer, rows, setting["pairs"])}


def load_trl(path: str, smoke: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.float32 if smoke else torch.bfloat16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0} if torch.cuda.is_available() else "cpu")
    return model, tokenizer


def run_trl(model, tokenizer, rows: list[dict], setting: dict, *, precompute: bool, smoke: bool,
            workdir: Path) -> tuple[dict, object]:
    """TRL's DPOTrainer on the same rows, with a fresh LoRA adapter from ``peft_config`` (TRL's own QLoRA path);
    returns the figures and the base model with the adapter taken out again, for the next run."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    max_length = max(sequence_lengths(tokenizer, rows))

    def args(steps: int) -> trl.DPOConfig:
        return trl.DPOConfig(output_dir=str(workdir / "trl"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                             beta=0.1, per_device_train_batch_size=setting["pairs"], max_length=max_length,
                             max_steps=steps, learning_rate=5e-5, gradient_checkpointing=True,
                             precompute_ref_log_probs=precompute, bf16=not smoke, use_cpu=smoke, report_to=[],
                             save_strategy="no", logging_steps=1000, disable_tqdm=True)

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    warm = trl.DPOTrainer(model=model, args=args(1), train_dataset=Dataset.from_list(rows[:setting["pairs"]]),
                          processing_class=tokenizer, peft_config=lora)
    warm.train()
    model = warm.model.unload()  # the base model again (a PEFT model given to TRL would get a second, "ref" adapter)
    del warm
    _reset_peak()
    _sync()
    start = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, args=args(setting["steps"]), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)
    trainer.train()
    _sync()
    seconds = time.perf_counter() - start
    model = trainer.model.unload()
    del trainer
    return {"seconds": seconds, "peak_gib": _peak_gib(), "tokens": real_tokens(tokenizer, rows),
            "steps": setting["steps"], "max_length": max_length}, model


def _allocated() -> float | None:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _micro_batch_tokens(tokenizer, rows: list[dict], pairs: int) -> dict[str, int]:
    """The largest micro-batch any order of ``rows`` can make (the ``pairs`` longest pairs): real tokens and
    completion tokens, what the planner needs for padding-free batches."""
    per_pair = []
    for row in rows:
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        total = [len(tokenizer(row["prompt"] + row[key])["input_ids"]) + 1 for key in ("chosen", "rejected")]
        per_pair.append((sum(total), sum(t - prompt for t in total)))
    longest = sorted(per_pair, reverse=True)[:pairs]
    return {"micro_batch_real_tokens": sum(r for r, _ in longest),
            "micro_batch_completion_tokens": sum(c for _, c in longest)}


def plan_for(shape, row: dict, pairs: int, precompute: bool, method: str = "rpo") -> memory.MemoryPlan:
    """The planner's prediction for a run of ours (padding-free micro-batches of the run's largest size)."""
    return memory.plan_memory(shape, max_length=row["max_length"], pairs=pairs, precompute_ref=precompute,
                              real_tokens=row["micro_batch_real_tokens"],
                              completion_tokens=row["micro_batch_completion_tokens"], method=method,
                              online_new_tokens=128)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths, 2 steps (CPU, make test)")
    parser.add_argument("--shapes", nargs="+", default=["mistral-7b", "llama-3-8b"])
    parser.add_argument("--skip-trl", action="store_true", help="rpo_lib only (TRL not installed)")
    parser.add_argument("--steps", type=float, default=1.0, help="multiply every setting's steps (e.g. 0.5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: beside this script)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the full benchmark needs a CUDA GPU (4-bit kernels, real sizes); run with --smoke here.")
    result: dict = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(0) if
                    torch.cuda.is_available() else platform.processor() or platform.machine(),
                    "torch": torch.__version__, "smoke": args.smoke, "runs": []}
    out = args.out or HERE / ("qlora_rpo_7b-smoke.json" if args.smoke else "qlora_rpo_7b.json")
    def save() -> None:  # what is measured so far, after each run
        out.write_text(json.dumps(result, indent=1, default=lambda _: None) + "\n")

    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        for shape in (args.shapes[:1] if args.smoke else args.shapes):
            run_shape(shape, Path(tmp), result, smoke=args.smoke, skip_trl=args.skip_trl, steps=args.steps,
                      save=save)
    print(f"wrote {out}")
    return result


def _scratch() -> str | None:
    """Where the random 7B checkpoints go: memory (/dev/shm) when it has room for them, else the temporary dir."""
    shm = Path("/dev/shm")
    try:
        return str(shm) if shm.is_dir() and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > 40 * 2**30 else None
    except OSError:
        return None


def run_shape(shape: str, tmp: Path, result: dict, *, smoke: bool, skip_trl: bool, steps: float = 1.0,
              path: str | None = None, deadline: float | None = None, save: Callable[[], None] | None = None) -> None:
    """Every setting of one shape: rpo_lib's runs on one loaded model, then TRL's on its own (one side in memory at a
    time, so each peak is its own), then (d) HyPO against RPO. ``path``: a checkpoint of that shape built already.

    Each run's figures go into ``result`` as soon as it ends (``save()`` is called then): a run cut short by a
    ``deadline`` (``time.monotonic()``; later runs are skipped and listed in ``result["skipped"]``) or by an error
    of TRL's (recorded in ``result["errors"]``) keeps what was measured before."""
    from transformers import AutoConfig

    save = save or (lambda: None)

    def in_time(what: str) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            result.setdefault("skipped", []).append(what)
            return False
        return True

    scale = 16 if smoke else 1
    path = path or build_checkpoint(shape, tmp, smoke)
    planned = memory.ModelShape.from_config(AutoConfig.from_pretrained(path))
    runs = []
    for name, setting in settings(smoke).items():
        setting = {**setting, "steps": 2 if smoke else max(1, round(setting["steps"] * steps))}
        if smoke or shape == "mistral-7b" or name == "c_long":
            rows = make_rows(setting, setting["pairs"] * setting["steps"], seed=0, scale=scale)
            runs += [(name, setting, rows, precompute) for precompute in (False, True)]
    model, tokenizer = load_ours(path, smoke)
    rows_out = []
    for name, setting, rows, precompute in runs:
        if not in_time(f"{shape} {name} precompute={precompute}"):
            continue
        ours = run_ours(model, tokenizer, rows, setting, precompute=precompute, smoke=smoke)
        plan = plan_for(planned, ours, setting["pairs"], precompute)
        row = {"shape": shape, "setting": name, "precompute_ref": precompute, "ours": ours,
               "planned_gib": plan.total_gib, "planned_parts_gib": _gib_parts(plan)}
        rows_out.append((row, setting, rows))
        result["runs"].append(row)
        print(_line(row), flush=True)
        save()
    if (smoke or shape == "mistral-7b") and in_time(f"{shape} HyPO against RPO"):  # (d) fixed lengths
        setting = {**settings(smoke)["a_fixed"], "steps": 2 if smoke else max(1, round(4 * steps))}
        rows = make_rows(setting, setting["pairs"] * setting["steps"], seed=1, scale=scale)
        rpo = run_ours(model, tokenizer, rows, setting, precompute=False, smoke=smoke)
        step = run_ours(model, tokenizer, rows, setting, precompute=False, method="hypo", smoke=smoke)
        result["hypo"] = {"shape": shape, "rpo": rpo, "hypo": step,
                          "hypo_step_over_rpo_step": step["seconds"] / rpo["seconds"],
                          "planned_gib": plan_for(planned, step, setting["pairs"], False, "hypo").total_gib,
                          "planned_parts_gib": _gib_parts(plan_for(planned, step, setting["pairs"], False, "hypo"))}
        print(f"HyPO step / RPO step: {result['hypo']['hypo_step_over_rpo_step']:.2f}x", flush=True)
        save()
    del model
    _reset_peak()
    if not skip_trl and rows_out:
        try:
            trl_model, trl_tokenizer = load_trl(path, smoke)
            for row, setting, rows in rows_out:
                if not in_time(f"TRL {shape} {row['setting']} precompute={row['precompute_ref']}"):
                    continue
                row["trl"], trl_model = run_trl(trl_model, trl_tokenizer, rows, setting,
                                                precompute=row["precompute_ref"], smoke=smoke, workdir=tmp)
                print(_line(row), flush=True)
                save()
            del trl_model
        except Exception as error:  # TRL's side failing must not cost rpo_lib's figures
            result.setdefault("errors", {})[f"TRL {shape}"] = f"{type(error).__name__}: {error}"[:2000]
            print(f"TRL failed on {shape}: {type(error).__name__}: {error}", flush=True)
        _reset_peak()
    save()


def _gib_parts(plan: memory.MemoryPlan) -> dict[str, float]:
    parts = {name: value / 2**30 for name, value in plan.parts.items()}
    return {**parts, "fixed": plan.fixed_bytes / 2**30, "largest phase": max(plan.phase_bytes.values()) / 2**30}


def _line(row: dict) -> str:
    ours = row["ours"]
    text = (f"{row['shape']:<11} {row['setting']:<11} precompute={row['precompute_ref']!s:<5} rpo_lib "
            f"{ours['tokens'] / ours['seconds']:9.0f} tok/s peak {_gib(ours['peak_gib'])} (planned "
            f"{row['planned_gib']:.1f} GiB)")
    if "trl" in row:
        trl = row["trl"]
        ratio = (ours["tokens"] / ours["seconds"]) / (trl["tokens"] / trl["seconds"])
        text += f" | TRL {trl['tokens'] / trl['seconds']:9.0f} tok/s peak {_gib(trl['peak_gib'])} | {ratio:.2f}x"
    return text


def _gib(value: float | None) -> str:
    return f"{value:5.1f} GiB" if value is not None else "  n/a (CPU)"


if __name__ == "__main__":
    main()
