"""Every GPU figure of the project in one command, sized for a short window on one H100/H200 (at most ~8 minutes).

    bash benchmarks/gpu_check.sh OUT_DIR            # a GPU machine: installs .whl/*.whl, then runs this
    bash benchmarks/gpu_check.sh OUT_DIR --smoke    # any machine: the same parts on tiny shapes (make test)

Parts, in order; each writes its figures into ``OUT_DIR/gpu_check.json`` and ``OUT_DIR/gpu_check.md`` as soon as it
ends, so a run cut short keeps what it measured, and a part that would not fit the time left (``--budget-s``) is
skipped with that reason:

1. **packing**: one micro-batch of random sequences scored padded and packed (``"mask"`` and ``"varlen"``, sdpa or
   the family's attention; flash-attention 2's varlen where it is installed) in bf16 on the GPU, for every family of
   ``rpo_lib.families``: the largest difference per completion token, beside bf16's own noise (padded bf16 against
   padded float32). This calibrates ``rpo_lib.train.PACKING_TOLERANCE`` for 16-bit dtypes.
2. **qlora**: ``benchmarks/qlora_rpo_7b.py`` on the Mistral-7B shape: fixed 2 x 1,024, a variable-length
   UltraFeedback-like mix (padding-free) and one pair at 4,096 tokens, the reference precomputed or not, against
   TRL 1.16; a HyPO step against an RPO step.
3. **full**: full fine-tuning of a 0.5B shape (float32 master weights, bf16 compute, the reference copy), for the
   planner's full-fine-tuning accounting.
4. **planner**: for each run of parts 2 and 3, ``rpo_lib.memory``'s prediction against the measured peak, part by
   part: what is loaded, what stays through the step (gradients, AdamW state, a reference copy) and the largest
   phase. The qlora part stops starting runs in time for the parts after it.
5. **launch**: ``benchmarks/launch_throughput.py``: one GPU through ``rpo_lib.launch`` against a plain ``Trainer``.
6. **targets**: each figure against the target the issue set (never asserted by a test): >= 1.2x TRL's tokens/s at
   fixed length with no more peak memory; >= 1.8x on the variable-length mix; the 4,096-token pair <= 14 GiB; a
   HyPO step <= 3x an RPO step; the planner within 15% of each measured peak; the launch >= 0.95 of the plain run.

Without ``--out-dir``'s figures copied beside this script (``benchmarks/gpu_check.json`` and ``.md``), the project has
no GPU figure: docs/scale.md says which are measured. ``--smoke`` writes ``gpu_check-smoke.*`` there too (ignored by
git); its times and sizes mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
GiB = 2**30
# Rough seconds each part takes on an H100/H200 (measured parts replace these in the JSON's "seconds").
PART_SECONDS = {"packing": 20, "checkpoint": 45, "qlora": 240, "full": 35, "launch": 75}
TARGETS = {"fixed_vs_trl": 1.2, "variable_vs_trl": 1.8, "long_pair_gib": 14.0, "hypo_over_rpo": 3.0,
           "planner_error": 0.15, "launch_over_plain": 0.95}


def _module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- packing
def packing_part(smoke: bool) -> dict:
    """Per family and attention path: max |packed - padded| per completion token in bf16, and bf16's own noise."""
    from rpo_lib import packing
    from rpo_lib.data import pad_rows
    from rpo_lib.families import FAMILIES, tiny_family_model
    from rpo_lib.logprobs import completion_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    vocab = 256
    prompts, completions = [], []
    for _ in range(8):
        p = int(torch.randint(2, 24, (1,), generator=generator))
        c = int(torch.randint(4, 40, (1,), generator=generator))
        prompts.append([1] + torch.randint(3, vocab, (p - 1,), generator=generator).tolist())
        completions.append(torch.randint(3, vocab, (c,), generator=generator).tolist())
    counts = torch.tensor([len(c) for c in completions], dtype=torch.float32, device=device)
    padded_batch = {k: v.to(device) for k, v in pad_rows(prompts, completions, 0).items()}
    packed_batch = packing.pack_sequences(prompts, completions, max_row_tokens=128, pad_token_id=0).to(device)
    flash = importlib.util.find_spec("flash_attn") is not None and device == "cuda"
    rows = []
    for name, family in FAMILIES.items():
        implementations = [family.attn_implementation] + (["flash_attention_2"] if flash else [])
        for implementation in implementations:
            row: dict[str, Any] = {"family": name, "attention": implementation}
            try:
                with torch.no_grad():
                    reference = tiny_family_model(name, vocab_size=vocab).to(device)  # float32, its own attention
                    model = tiny_family_model(name, vocab_size=vocab, dtype=torch.bfloat16,
                                              attn_implementation=implementation).to(device)

                    def padded(m: Any) -> torch.Tensor:
                        return completion_logprobs(m, padded_batch["input_ids"], padded_batch["attention_mask"],
                                                   padded_batch["completion_mask"])[0]

                    exact = padded(reference)
                    ours = padded(model)
                    row["bf16_noise_per_token"] = float(((ours - exact).abs() / counts).max())
                    for mode in ("mask", "varlen"):
                        if packing.unsupported(model, mode) is not None:
                            row[mode] = "refused"
                            continue
                        packed = packing.packed_completion_logprobs(model, packed_batch, attention=mode)[0]
                        row[mode] = float(((packed - ours).abs() / counts).max())
            except Exception as error:  # a family this transformers or this GPU cannot run: recorded, not fatal
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
    return {"device": device, "dtype": "bfloat16", "rows": rows}


# ------------------------------------------------------------------------------------------------- qlora
def qlora_part(smoke: bool, path: str, tmp: Path, skip_trl: bool, figures: dict, save: Callable[[], None],
               deadline: float | None) -> dict:
    """qlora_rpo_7b.run_shape on the Mistral-7B shape, its figures in ``figures["qlora"]`` as each run ends."""
    qlora = _module("qlora_rpo_7b")
    result: dict = figures.setdefault("qlora", {"runs": []})
    qlora.run_shape("mistral-7b", tmp, result, smoke=smoke, skip_trl=skip_trl, steps=0.75, path=path,
                    deadline=deadline, save=save)
    return result


def full_part(smoke: bool, tmp: Path) -> dict:
    """Full fine-tuning (float32 master weights, bf16 compute, the frozen reference copy), a 0.5B shape: what the
    planner's full-fine-tuning accounting predicts against what is measured."""
    from transformers import AutoConfig

    from rpo_lib import memory
    from rpo_lib.models import load_policy

    qlora = _module("qlora_rpo_7b")
    path = qlora.build_checkpoint("qwen2.5-0.5b", tmp, smoke)
    model, tokenizer = load_policy(path, quantization=None, lora=None, dtype=None if smoke else torch.bfloat16)
    scale = 16 if smoke else 1
    setting = {"pairs": 2, "prompt": 512 // scale, "answer": (512 // scale, 512 // scale), "steps": 3}
    rows = qlora.make_rows(setting, setting["pairs"] * setting["steps"], seed=2, scale=scale)
    ours = qlora.run_ours(model, tokenizer, rows, setting, precompute=False, method="dpo", smoke=smoke)
    shape = memory.ModelShape.from_config(AutoConfig.from_pretrained(path))
    plan = memory.plan_memory(shape, lora_r=None, quantization=None, max_length=ours["max_length"],
                              pairs=setting["pairs"], real_tokens=ours["micro_batch_real_tokens"],
                              completion_tokens=ours["micro_batch_completion_tokens"], method="dpo")
    del model
    return {"shape": "qwen2.5-0.5b", "ours": ours, "planned_gib": plan.total_gib,
            "planned_parts_gib": qlora._gib_parts(plan), "master_dtype": "float32"}


def planner_part(figures: dict) -> dict:
    """Predicted against measured for every rpo_lib run of the qlora and full parts, whole and by part: what is
    loaded (weights, and a LoRA adapter's own weights), what stays through the step (with gradients, AdamW state and
    a reference copy), and the largest phase (the peak above that; planned here without its margin)."""
    rows = []
    qlora = figures.get("qlora", {})
    runs = [(f"QLoRA {r['setting']}{' (precomputed ref)' if r['precompute_ref'] else ''}", r["ours"], r)
            for r in qlora.get("runs", [])]
    if "hypo" in qlora:
        runs.append(("QLoRA HyPO (d)", qlora["hypo"]["hypo"], qlora["hypo"]))
    if "full" in figures:
        runs.append(("full fine-tuning, 0.5B", figures["full"]["ours"], figures["full"]))
    for label, ours, planned in runs:
        peak, before, after = ours.get("peak_gib"), ours.get("held_before_gib"), ours.get("held_after_gib")
        measured = peak is not None  # None on a CPU (--smoke): the rows are made, with nothing measured
        parts = planned["planned_parts_gib"]
        adapter = parts.get("LoRA + AdamW state", 0.0) / 4  # the adapter's float32 weights: 4 of its 16 bytes
        rows.append({"run": label, "planned_gib": planned["planned_gib"], "measured_gib": peak,
                     "error": planned["planned_gib"] / peak - 1 if measured else None,
                     "loaded": {"planned": parts["weights"] + adapter, "measured": before},
                     "kept": {"planned": parts["fixed"], "measured": after},
                     "largest phase": {"planned": parts["largest phase"],
                                       "measured": peak - after if measured else None}})
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------ launch
def launch_part(smoke: bool, path: str, out: Path) -> dict:
    launch = _module("launch_throughput")
    return launch.main(["--smoke"] * smoke + ["--model-dir", path, "--steps", "2" if smoke else "15",
                                              "--out", str(out / "launch_throughput.json")])


# ----------------------------------------------------------------------------------------------- targets
def targets(figures: dict) -> list[dict]:
    """Each figure of the issue against its target: measured value, target, met (None: not measured)."""
    rows = []

    def add(name: str, target: str, value: float | None, met: bool | None, shown: str) -> None:
        rows.append({"figure": name, "target": target, "value": value, "met": met, "shown": shown})

    runs = {(r["setting"], r["precompute_ref"]): r for r in figures.get("qlora", {}).get("runs", [])}
    for setting, key, label in (("a_fixed", "fixed_vs_trl", "tokens/s against TRL, fixed 2 x 1,024"),
                                ("b_variable", "variable_vs_trl", "tokens/s against TRL, variable lengths")):
        run = runs.get((setting, False))
        if run is None or "trl" not in run:
            add(label, f">= {TARGETS[key]}x", None, None, "not measured")
            continue
        ratio = (run["ours"]["tokens"] / run["ours"]["seconds"]) / (run["trl"]["tokens"] / run["trl"]["seconds"])
        peaks = (run["ours"]["peak_gib"], run["trl"]["peak_gib"])
        memory_ok = None if None in peaks else peaks[0] <= peaks[1]
        extra = "" if None in peaks else f"; peak {peaks[0]:.1f} vs TRL {peaks[1]:.1f} GiB"
        met = ratio >= TARGETS[key] and (memory_ok is not False if setting == "a_fixed" else True)
        add(label, f">= {TARGETS[key]}x" + (", no more peak memory" if setting == "a_fixed" else ""), ratio, met,
            f"{ratio:.2f}x{extra}")
    long = [r["ours"]["peak_gib"] for (s, _), r in runs.items() if s == "c_long" and r["ours"]["peak_gib"]]
    add("peak of one 4,096-token pair", f"<= {TARGETS['long_pair_gib']} GiB", max(long) if long else None,
        (max(long) <= TARGETS["long_pair_gib"]) if long else None, f"{max(long):.1f} GiB" if long else "not measured")
    hypo = figures.get("qlora", {}).get("hypo")
    ratio = hypo["hypo_step_over_rpo_step"] if hypo else None
    add("HyPO step / RPO step", f"<= {TARGETS['hypo_over_rpo']}x", ratio,
        ratio <= TARGETS["hypo_over_rpo"] if ratio is not None else None, f"{ratio:.2f}x" if ratio else "not measured")
    planner = figures.get("planner", {}).get("rows", [])
    worst = max((abs(r["error"]) for r in planner if r["error"] is not None), default=None)
    add("planner against each measured peak", f"within {TARGETS['planner_error']:.0%}", worst,
        worst <= TARGETS["planner_error"] if worst is not None else None,
        f"worst {worst:.0%}" if worst is not None else "not measured")
    launch = figures.get("launch", {})
    ratio = launch.get("launched_over_plain")
    add("launch / plain Trainer throughput", f">= {TARGETS['launch_over_plain']}", ratio,
        ratio >= TARGETS["launch_over_plain"] if ratio is not None else None,
        f"{ratio:.3f}" if ratio is not None else "not measured")
    return rows


def markdown(figures: dict) -> str:
    lines = [f"# GPU check, {figures['date']}: {figures['device']}", "",
             f"torch {figures['torch']}, transformers {figures['transformers']}" +
             (" — SMOKE RUN: tiny shapes on this machine, the figures mean nothing" if figures["smoke"] else ""), "",
             "| figure | target | measured | met |", "|---|---|---|---|"]
    for row in figures.get("targets", []):
        met = {True: "yes", False: "**no**", None: "—"}[row["met"]]
        lines.append(f"| {row['figure']} | {row['target']} | {row['shown']} | {met} |")
    for run in figures.get("qlora", {}).get("runs", []):
        if run is figures["qlora"]["runs"][0]:
            lines += ["", "## QLoRA RPO, Mistral-7B shape", "",
                      "| setting | reference | rpo_lib tok/s | peak GiB | planned GiB | TRL tok/s | TRL peak GiB |",
                      "|---|---|---|---|---|---|---|"]
        ours, trl = run["ours"], run.get("trl")
        lines.append(f"| {run['setting']} | {'precomputed' if run['precompute_ref'] else 'in the step'} | "
                     f"{ours['tokens'] / ours['seconds']:.0f} | {_num(ours['peak_gib'])} | {run['planned_gib']:.2f} | "
                     f"{_num(trl['tokens'] / trl['seconds'], 0) if trl else '—'} | "
                     f"{_num(trl['peak_gib']) if trl else '—'} |")
    planner = figures.get("planner", {}).get("rows", [])
    if planner:
        lines += ["", "## The planner, part by part (GiB, planned / measured)", "",
                  "| run | peak | error | loaded | kept through the step | largest phase (no margin) |",
                  "|---|---|---|---|---|---|"]
        for row in planner:
            cells = [f"{row[k]['planned']:.2f} / {_num(row[k]['measured'], 2)}" for k in ("loaded", "kept",
                                                                                        "largest phase")]
            error = f"{row['error']:+.0%}" if row["error"] is not None else "—"
            lines.append(f"| {row['run']} | {row['planned_gib']:.2f} / {_num(row['measured_gib'], 2)} | {error} | "
                         + " | ".join(cells) + " |")
    packing = figures.get("packing", {}).get("rows", [])
    if packing:
        lines += ["", "## Packed against padded, bf16 (largest difference per completion token, nats)", "",
                  "| family | attention | bf16 noise | mask | varlen |", "|---|---|---|---|---|"]
        for row in packing:
            if "error" in row:
                lines.append(f"| {row['family']} | {row['attention']} | {row['error']} | | |")
                continue
            lines.append(f"| {row['family']} | {row['attention']} | {row['bf16_noise_per_token']:.2e} | "
                         f"{_cell(row['mask'])} | {_cell(row['varlen'])} |")
    for name, part in figures.get("skipped", {}).items():
        lines.append(f"\n- {name}: skipped ({part})")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.2e}"


def _versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "flash-attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _import_problem(*names: str) -> str | None:
    """Why one of ``names`` cannot be imported (a wheel missing, or one that does not fit this machine), or None."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or a package that breaks on import
            return f"{name} cannot be imported ({type(error).__name__}: {str(error)[:200]})"
    return None


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any machine (structure only)")
    parser.add_argument("--budget-s", type=float, default=460, help="skip a part that would end after this")
    parser.add_argument("--skip-trl", action="store_true", help="no TRL comparison (TRL or datasets missing)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("the GPU check needs a CUDA GPU; run it with --smoke here (structure only).")
    import transformers

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    trl_problem = None if args.skip_trl else _import_problem("trl", "datasets")
    figures: dict[str, Any] = {
        "date": date.today().isoformat(), "smoke": args.smoke, "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "seconds": {}, "skipped": {},
        "errors": {}, "versions": _versions()}
    skip_trl = args.skip_trl or trl_problem is not None
    if trl_problem is not None:
        figures["skipped"]["TRL comparison"] = f"{trl_problem} (see benchmarks/README.md)"

    def write() -> None:
        figures["targets"] = targets(figures)
        stem = "gpu_check-smoke" if args.smoke else "gpu_check"
        (args.out / "gpu_check.json").write_text(json.dumps(figures, indent=1) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(figures))
        for suffix in (".json", ".md"):  # beside the scripts too (copy them into the repository from OUT_DIR)
            shutil.copyfile(args.out / f"gpu_check{suffix}", HERE / f"{stem}{suffix}")

    def part(name: str, run: Callable[[], Any]) -> None:
        elapsed = time.monotonic() - started
        if not args.smoke and elapsed + PART_SECONDS.get(name, 0) > args.budget_s:
            figures["skipped"][name] = f"{elapsed:.0f} s spent, about {PART_SECONDS.get(name, 0)} s needed, budget " \
                                       f"{args.budget_s:.0f} s"
        else:
            began = time.monotonic()
            try:
                figures[name] = run()
            except Exception:  # one part's failure must not cost the others' figures
                figures["errors"][name] = traceback.format_exc()[-4000:]
                print(figures["errors"][name], file=sys.stderr)
            figures["seconds"][name] = time.monotonic() - began
        write()
        print(f"[gpu_check] {name} done at {time.monotonic() - started:.0f} s", flush=True)

    qlora = _module("qlora_rpo_7b")
    scratch = qlora._scratch()
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        part("packing", lambda: packing_part(args.smoke))
        path_holder: dict[str, str] = {}

        def build() -> dict:
            path_holder["path"] = qlora.build_checkpoint("mistral-7b", Path(tmp), args.smoke)
            return {"scratch": scratch or tempfile.gettempdir()}

        part("checkpoint", build)
        if "path" in path_holder:
            later = PART_SECONDS["full"] + PART_SECONDS["launch"]  # what the parts after qlora need
            deadline = None if args.smoke else started + args.budget_s - later
            part("qlora", lambda: qlora_part(args.smoke, path_holder["path"], Path(tmp), skip_trl, figures, write,
                                             deadline))
            part("full", lambda: full_part(args.smoke, Path(tmp)))
            part("planner", lambda: planner_part(figures))
            part("launch", lambda: launch_part(args.smoke, path_holder["path"], args.out))
    figures["seconds"]["total"] = time.monotonic() - started
    write()
    print(markdown(figures))
    return figures


if __name__ == "__main__":
    main()
