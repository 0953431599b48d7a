"""Seconds per optimizer step of rpo_lib.train.Trainer, per method and micro-batch size.

    python benchmarks/train_step.py             # the shipped tiny reference on this machine's device
    python benchmarks/train_step.py --model ID  # any causal LM (on a GPU: e.g. a 7B model, with --lora --4bit)

The same batch of 16 pairs is split into 1, 4 or 16 micro-batches: with exact accumulation the update is the
same, only the time differs. HyPO draws its whole step's online samples first (k=2 per prompt), so its
sampling cost does not grow with the number of micro-batches. Median of the steps after two warm-up steps.
Writes train_step.json (or train_step-<name>.json) beside this script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rpo_lib.env import device  # noqa: E402
from rpo_lib.tasks import DATA_DIR, load_reference, read_jsonl  # noqa: E402
from rpo_lib.train import Trainer, preset  # noqa: E402


def load(args):
    if args.model is None:
        return load_reference()
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kwargs = {"dtype": torch.bfloat16}
    if args.four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(args.model, **kwargs), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id or path (default: the shipped tiny reference)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (r=16, all linear layers)")
    parser.add_argument("--four-bit", action="store_true", help="load the model in 4-bit NF4 (bitsandbytes)")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    base, tokenizer = load(args)
    rows = read_jsonl(DATA_DIR / "preferences.jsonl")[:256]
    figures = {}
    for method in ("dpo", "rpo", "hypo"):
        for micro in (16, 4, 1):
            model = base if args.four_bit else copy.deepcopy(base)  # a 4-bit model is not copied: LoRA on it
            if args.lora:
                from rpo_lib.models import with_lora
                model = with_lora(model)
            config = preset("tiny", method=method, batch_size=16, micro_batch_size=micro, max_steps=args.steps + 2,
                            progress=False, warmup_steps=0)
            trainer = Trainer(model, tokenizer, rows, config, ref_model=None if args.lora else base)
            times = []
            for step in range(args.steps + 2):
                start = time.perf_counter()
                trainer._optimizer_step(step)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            figures[f"{method}/micro{micro}"] = round(statistics.median(times[2:]), 4)
            print(f"{method:5s} micro-batch {micro:2d}: {figures[f'{method}/micro{micro}']:.4f} s/step")
            if args.four_bit:
                base = model.unload()  # the adapter off again, for the next configuration
    name = "train_step" if args.model is None else f"train_step-{Path(args.model).name}"
    record = {"what": "seconds per optimizer step of 16 pairs (median)", "device": str(device()),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpu": platform.processor() or platform.machine(), "cpu_threads": os.cpu_count(),
              "model": args.model or "data/gold_task/reference", "lora": args.lora, "four_bit": args.four_bit,
              "torch": torch.__version__, "seconds": figures}
    path = Path(__file__).with_name(name + ".json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
