"""A real chat model on a CPU: rpo_lib (padded, padding-free) against TRL 1.16's DPOTrainer, side by side.

    python benchmarks/real_model_cpu.py            # SmolLM2-135M-Instruct, 6 steps of 4 pairs each: ~10 min, 2 cores
    python benchmarks/real_model_cpu.py --smoke    # 2 steps of 2 pairs (what the tests run; no timing asserted)

The model is SmolLM2-135M-Instruct (``rpo_lib.models.smollm2``: offline from PyPI's GGUF, or the Hub's copy) in
float32 with a LoRA adapter (r=16, every linear layer), trained with RPO (DPO's sigmoid loss plus TRL's token-mean
SFT term, weight 1: TRL's ``loss_type=["sigmoid", "sft"]``). The rows are a variable-length chat mix: single-turn
pairs of SmolLM2's own replies (``data/chat_pairs``) and multi-turn chats made of them (``chat_mix``). Each side
trains one epoch over the same rows (``steps x pairs``), after a one-step warm-up.

Each run is its own process, so that its peak resident memory (``ru_maxrss``) is its own. Figures: real tokens per
second (prompt and completion tokens of every row, no padding), seconds per step, peak RSS, and the ratios to TRL
without a precomputed reference. Writes ``real_model_cpu.json`` beside this script (``--out`` elsewhere);
``--table`` writes that file's figures as docs/scale.md's table (between its ``real_model_cpu table`` markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {  # name: (library, padding_free, precomputed reference)
    "rpo_lib padded": ("rpo_lib", False, False),
    "rpo_lib padding-free": ("rpo_lib", True, False),
    "rpo_lib padding-free, precomputed ref": ("rpo_lib", True, True),
    "TRL DPOTrainer": ("trl", False, False),
    "TRL DPOTrainer, precomputed ref": ("trl", False, True),
}
BASELINE = "TRL DPOTrainer"
MAX_LENGTH = 512


def chat_mix(n_pairs: int, seed: int = 0) -> list[dict]:
    """``n_pairs`` conversational pairs of SmolLM2's own replies (``data/chat_pairs``): three single-turn pairs (50 to
    100 tokens), then one whose prompt carries 2 to 7 earlier exchanges of other pairs before the same question (a
    multi-turn chat of 200 to 500 tokens), and so on. Seeded: the same rows on every side and every machine."""
    from rpo_lib.chat_task import load_chat_pairs

    rng = random.Random(seed)
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_chat_pairs()]
    rows = []
    for i in range(n_pairs):
        row = pairs[i % len(pairs)]
        if i % 4 == 3:
            history = [message for j in rng.sample(range(len(pairs)), rng.randint(2, 7))
                       for message in pairs[j]["prompt"] + pairs[j]["chosen"]]
            row = {**row, "prompt": history + row["prompt"]}
        rows.append(row)
    return rows


def _lora():
    from rpo_lib.models import LoraSettings

    return LoraSettings(r=16, alpha=32)


def run_one(name: str, rows: list[dict], pairs: int, steps: int, workdir: Path) -> dict:
    """One run, in this process: seconds of ``steps`` steps after a one-step warm-up, and the process's peak RSS."""
    import torch

    from rpo_lib.data import tokenize_preferences
    from rpo_lib.models import load_policy, smollm2
    from rpo_lib.train import TrainConfig, Trainer

    torch.manual_seed(0)
    library, padding_free, precompute = RUNS[name]
    path = smollm2()
    examples, _ = tokenize_preferences(rows, _tokenizer(path), max_length=MAX_LENGTH)
    tokens = sum(len(e.prompt_ids) * 2 + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    if library == "rpo_lib":
        model, tokenizer = load_policy(path, quantization=None, lora=_lora(), gradient_checkpointing=False,
                                       device="cpu")

        def config(n: int) -> TrainConfig:
            return TrainConfig(method="rpo", beta=0.1, sft_weight=1.0, rpo_variant="trl", learning_rate=5e-5,
                               batch_size=pairs, max_steps=n, max_length=MAX_LENGTH, warmup_steps=0,
                               lr_schedule="constant", padding_free=padding_free, precompute_ref_logps=precompute,
                               progress=False)

        Trainer(model, tokenizer, rows[:pairs], config(1)).train()  # warm-up: allocator, kernels
        start = time.perf_counter()
        Trainer(model, tokenizer, rows, config(steps)).train()
        seconds = time.perf_counter() - start
    else:
        import trl
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM

        tokenizer = _tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

        def args(n: int) -> trl.DPOConfig:
            return trl.DPOConfig(output_dir=str(workdir / "trl"), loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                                 beta=0.1, per_device_train_batch_size=pairs, max_length=MAX_LENGTH, max_steps=n,
                                 learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0,
                                 precompute_ref_log_probs=precompute, bf16=False, use_cpu=True, report_to=[],
                                 save_strategy="no", logging_steps=1000, disable_tqdm=True)

        warm = trl.DPOTrainer(model=model, args=args(1), train_dataset=Dataset.from_list(rows[:pairs]),
                              processing_class=tokenizer, peft_config=lora)
        warm.train()
        model = warm.model.unload()
        del warm
        start = time.perf_counter()
        trl.DPOTrainer(model=model, args=args(steps), train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                       peft_config=lora).train()
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    return {"run": name, "library": library, "padding_free": padding_free, "precomputed_ref": precompute,
            "seconds": seconds, "steps": steps, "pairs_per_step": pairs, "real_tokens": tokens,
            "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / steps, "peak_rss_gib": peak}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 steps of 2 pairs (a test of the code, not a timing)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("real_model_cpu.json")))
    parser.add_argument("--table", action="store_true", help="write the JSON's figures into docs/scale.md and stop")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one run, written to --out
    args = parser.parse_args(argv)
    if args.table:
        readme = ROOT / "docs" / "scale.md"
        readme.write_text(with_table(readme.read_text(), json.loads(Path(args.out).read_text())))
        return {}
    pairs, steps = (2, 2) if args.smoke else (4, 6)
    rows = chat_mix(pairs * steps)
    if args.one:
        with tempfile.TemporaryDirectory() as work:
            Path(args.out).write_text(json.dumps(run_one(args.one, rows, pairs, steps, Path(work))))
        return {}
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    import torch
    import transformers

    from rpo_lib.models import smollm2

    smollm2()  # convert once, before the children
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for name in tqdm(RUNS, desc="runs"):
            out = Path(work) / "run.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(out)]
            subprocess.run(command + (["--smoke"] if args.smoke else []), check=True, cwd=ROOT)
            runs.append(json.loads(out.read_text()))
    base = next(r for r in runs if r["run"] == BASELINE)
    for run in runs:
        run["speed_vs_trl"] = run["tokens_per_s"] / base["tokens_per_s"]
        run["memory_vs_trl"] = run["peak_rss_gib"] / base["peak_rss_gib"]
    import trl

    result = {"what": "SmolLM2-135M-Instruct, LoRA r=16, RPO (sigmoid + token-mean SFT), float32 on a CPU; "
                      "one epoch over a variable-length chat mix after a one-step warm-up",
              "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke, "machine": platform.machine(),
              "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
              "model_source": _source(), "max_length": MAX_LENGTH, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for run in runs:
        print(f"{run['run']:<40} {run['tokens_per_s']:7.1f} tokens/s ({run['speed_vs_trl']:.2f}x TRL)  "
              f"{run['seconds_per_step']:6.1f} s/step  peak RSS {run['peak_rss_gib']:.2f} GiB "
              f"({run['memory_vs_trl']:.2f}x)")
    return result


START, END = "<!-- real_model_cpu table -->", "<!-- end real_model_cpu table -->"


def table(result: dict) -> str:
    """The benchmark's figures as a markdown table, with the machine and date they were measured on."""
    lines = [f"Measured {result['date']} on {result['cpu']} ({result['cpu_threads']} threads), "
             f"torch {result['torch']}, transformers {result['transformers']}, TRL {result['trl']}; SmolLM2 from "
             f"{result['model_source']}.", "",
             "| run | real tokens/s | vs TRL | s/step | peak RSS (GiB) | vs TRL |", "|---|---|---|---|---|---|"]
    for run in result["runs"]:
        lines.append(f"| {run['run']} | {run['tokens_per_s']:.1f} | {run['speed_vs_trl']:.2f}x | "
                     f"{run['seconds_per_step']:.1f} | {run['peak_rss_gib']:.2f} | {run['memory_vs_trl']:.2f}x |")
    return "\n".join(lines)


def with_table(readme: str, result: dict) -> str:
    """``readme`` with the text between the table markers replaced by ``table(result)``."""
    start, end = readme.index(START) + len(START), readme.index(END)
    return readme[:start] + "\n" + table(result) + "\n" + readme[end:]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _source() -> str:
    from rpo_lib.models import SMOLLM2_SOURCE_FILE, smollm2

    marker = Path(smollm2()) / SMOLLM2_SOURCE_FILE
    return json.loads(marker.read_text())["source"] if marker.exists() else "hub"


if __name__ == "__main__":
    main()
