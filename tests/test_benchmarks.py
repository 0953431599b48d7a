"""The benchmarks' smoke modes (qlora_rpo_7b.py, launch_throughput.py, real_model_cpu.py, gpu_check): the same code as
and no timing asserted."""

import json
import math
from pathlib import Path

import pytest
from helpers import load_file

pytest.importorskip("trl", reason="the benchmark compares with TRL, a test dependency: pip install -e '.[dev]'")


def _smoke_run(name: str, tmp_path: Path) -> dict:
    """Run ``benchmarks/<name>.py --smoke`` and return what it wrote."""
    module = load_file(f"benchmarks/{name}.py")
    out = tmp_path / "smoke.json"
    module.main(["--smoke", "--out", str(out)])
    return json.loads(out.read_text())


@pytest.mark.slow
def test_qlora_benchmark_smoke_mode_writes_every_setting(tmp_path):
    result = _smoke_run("qlora_rpo_7b", tmp_path)
    assert result["smoke"] is True
    seen = {(run["setting"], run["precompute_ref"]) for run in result["runs"]}
    assert seen == {(s, p) for s in ("a_fixed", "b_variable", "c_long") for p in (False, True)}
    for run in result["runs"]:
        for side in ("ours", "trl"):
            figures = run[side]
            assert figures["tokens"] > 0 and figures["steps"] == 2
            assert isinstance(figures["seconds"], float)  # a time: recorded, never compared
        assert run["ours"]["tokens"] == run["trl"]["tokens"]  # the same rows on both sides
        assert run["planned_gib"] > 0
    assert math.isfinite(result["hypo"]["hypo_step_over_rpo_step"])


@pytest.mark.slow
def test_launch_benchmark_smoke_mode_times_both_sides(tmp_path):
    """benchmarks/launch_throughput.py --smoke: a plain Trainer and a 1-process rpo_lib.launch on the same run."""
    result = _smoke_run("launch_throughput", tmp_path)
    assert result["smoke"] is True and result["steps"] == 2 and result["real_tokens"] > 0
    for side in ("plain", "launched"):
        assert result[side]["seconds"] > 0  # recorded, never compared
    assert math.isfinite(result["launched_over_plain"])


@pytest.mark.slow
def test_the_gpu_check_smoke_mode_runs_every_part_through_its_shell_command(tmp_path):
    """benchmarks/gpu_check.sh --smoke: the one command a GPU window runs, on tiny shapes (structure, never speed)."""
    import os
    import subprocess
    import sys

    from rpo_lib.families import FAMILIES

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(out), "--smoke"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["smoke"] is True and not figures["errors"] and not figures["skipped"]
    assert {row["family"] for row in figures["packing"]["rows"]} == set(FAMILIES)
    for row in figures["packing"]["rows"]:
        for mode in ("mask", "varlen"):
            assert (row[mode] == "refused") == (FAMILIES[row["family"]].packing[mode] == "refused"), row
    assert len(figures["qlora"]["runs"]) == 6 and "hypo" in figures["qlora"]
    assert all("trl" in run for run in figures["qlora"]["runs"])
    assert figures["full"]["master_dtype"] == "float32" and figures["full"]["ours"]["steps"] == 3
    assert figures["versions"]["trl"] != "not installed"
    runs = [row["run"] for row in figures["planner"]["rows"]]
    assert len(runs) == 8 and runs[-1] == "full fine-tuning, 0.5B"  # 6 QLoRA runs, HyPO, full fine-tuning
    assert all(row["kept"]["planned"] > 0 and row["measured_gib"] is None for row in figures["planner"]["rows"])
    assert isinstance(figures["launch"]["launched_over_plain"], float)
    assert [row["figure"] for row in figures["targets"]][:2] == ["tokens/s against TRL, fixed 2 x 1,024",
                                                                 "tokens/s against TRL, variable lengths"]
    assert len(figures["targets"]) == 6
    assert "SMOKE RUN" in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_real_model_cpu_benchmark_smoke_mode_runs_every_side(tmp_path):
    """SmolLM2 on a CPU: rpo_lib padded and padding-free, TRL with and without a precomputed reference, each in its
    own process, on the same rows."""
    result = _smoke_run("real_model_cpu", tmp_path)
    assert result["smoke"] is True and result["date"] and result["cpu"]
    names = [run["run"] for run in result["runs"]]
    assert names == ["rpo_lib padded", "rpo_lib padding-free", "rpo_lib padding-free, precomputed ref",
                     "TRL DPOTrainer", "TRL DPOTrainer, precomputed ref"]
    assert len({run["real_tokens"] for run in result["runs"]}) == 1  # the same rows on every side
    for run in result["runs"]:
        assert run["steps"] == 2 and run["seconds"] > 0 and run["peak_rss_gib"] > 0
        assert math.isfinite(run["speed_vs_trl"]) and math.isfinite(run["memory_vs_trl"])


def test_the_readme_cpu_table_is_the_committed_benchmark_json():
    """docs/scale.md's CPU figures are real_model_cpu.json's, written by `real_model_cpu.py --table`, not typed."""
    root = Path(__file__).resolve().parents[1]
    module = load_file("benchmarks/real_model_cpu.py")
    result = json.loads((root / "benchmarks" / "real_model_cpu.json").read_text())
    assert result["smoke"] is False and result["date"]
    readme = (root / "docs" / "scale.md").read_text()
    assert module.with_table(readme, result) == readme
