"""One GPU through ``rpo_lib.launch`` against a plain ``Trainer`` in this process: the launcher's cost.

    python benchmarks/launch_throughput.py                 # a GPU: QLoRA RPO on a Mistral-7B shape (random weights)
    python benchmarks/launch_throughput.py --shape qwen2.5-0.5b
    python benchmarks/launch_throughput.py --smoke         # any machine: a tiny model, 2 steps (make test)

The same config, rows and model directory on both sides (NF4 + LoRA r=16 on every linear layer, gradient
checkpointing, padding-free batches, RPO with a token-mean SFT term, 2 pairs of 512 + 512 tokens per step). The
plain side loads the model here and times ``Trainer.train()``; the launched side is ``rpo_lib.launch.launch(...,
num_processes=1)``, whose process times the same call (``result.json``'s ``train_seconds``). Both are cold (no
warm-up step), so the first step's set-up is in both. The launch's start-up (a new interpreter, imports, loading)
is reported apart: it is paid once per run, not per step.

The issue's target: the launched run's steps per second within 5% of the plain run's. Nothing here is asserted:
``tests/test_benchmarks.py`` runs the smoke mode and checks what it writes. Prints a table and writes
``launch_throughput.json`` (``--smoke``: ``launch_throughput-smoke.json``) beside this script.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rpo_lib.launch  # noqa: E402
from rpo_lib.models import LoraSettings, load_policy  # noqa: E402
from rpo_lib.train import Trainer, preset  # noqa: E402

HERE = Path(__file__).resolve().parent


def _qlora_benchmark():
    """benchmarks/qlora_rpo_7b.py: its random-weight checkpoints and its rows (one source for both benchmarks)."""
    spec = importlib.util.spec_from_file_location("qlora_rpo_7b", HERE / "qlora_rpo_7b.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="mistral-7b", help="a key of rpo_lib.memory.SHAPES")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps, on any machine")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: beside this script)")
    parser.add_argument("--model-dir", help="a checkpoint of --shape built already (qlora_rpo_7b.build_checkpoint)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark measures a GPU: run it where torch.cuda.is_available(), or use --smoke.")
    qlora = _qlora_benchmark()
    steps = 2 if args.smoke else args.steps
    scale = 16 if args.smoke else 1
    setting = {"pairs": 2, "prompt": 512 // scale, "answer": (512 // scale, 512 // scale), "steps": steps}
    work = Path(tempfile.mkdtemp(prefix="launch-bench-"))
    path = args.model_dir or qlora.build_checkpoint(args.shape, work, args.smoke)
    rows = qlora.make_rows(setting, 2 * steps, seed=0, scale=scale)
    lora = LoraSettings(r=16, alpha=32)
    dtype = None if args.smoke else torch.bfloat16

    model, tokenizer = load_policy(path, quantization="nf4", lora=lora, dtype=dtype)
    config = preset("qlora_7b", beta=0.1, eta=None, sft_weight=1.0, rpo_variant="trl", batch_size=2,
                    micro_batch_size=2, max_length=max(qlora.sequence_lengths(tokenizer, rows)), max_prompt_length=None,
                    max_steps=steps, warmup_steps=0, padding_free=True, progress=False, save_every=0)
    trainer = Trainer(model, tokenizer, rows, config)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    plain_seconds = time.perf_counter() - started
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    result = rpo_lib.launch.launch(config, model=path, data=rows, output_dir=work / "launched", num_processes=1,
                            quantization="nf4", lora=lora, dtype=None if args.smoke else "bfloat16", echo=False)
    launched_seconds = result.info["train_seconds"]
    tokens = qlora.real_tokens(tokenizer, rows)
    out = {
        "date": date.today().isoformat(), "smoke": args.smoke, "shape": args.shape if not args.smoke else "tiny",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0], "steps": steps, "real_tokens": tokens,
        "plain": {"seconds": plain_seconds, "steps_per_s": steps / plain_seconds},
        "launched": {"seconds": launched_seconds, "steps_per_s": steps / launched_seconds,
                     "start_up_seconds": result.seconds - launched_seconds},
        "launched_over_plain": plain_seconds / launched_seconds,  # 1.0: the same speed; the target is >= 0.95
    }
    print(f"{'':<12}{'steps/s':>10}{'real tokens/s':>15}")
    for side in ("plain", "launched"):
        print(f"{side:<12}{out[side]['steps_per_s']:>10.3f}{tokens / out[side]['seconds']:>15.0f}")
    print(f"launched / plain throughput: {out['launched_over_plain']:.3f} (target >= 0.95); the launch's start-up: "
          f"{out['launched']['start_up_seconds']:.1f} s, once per run" + ("  [smoke: times mean nothing]"
                                                                         if args.smoke else ""))
    target = args.out or HERE / ("launch_throughput-smoke.json" if args.smoke else "launch_throughput.json")
    target.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
