"""The project's own plumbing: pins agree, fast mode parses, exercise checks behave."""

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


def test_exercise_check(capsys):
    assert exercises.check("E1", None, 1.0) is False
    assert "not answered yet" in capsys.readouterr().out
    assert exercises.check("E1", 0.5, 0.7, hint="Use s(r1 - r0).") is False
    assert "Use s(r1 - r0)" in capsys.readouterr().out
    assert exercises.check("E1", [0.5, 1.0], [0.5, 1.0 + 1e-9]) is True
    assert exercises.check("E1", [0.5], [0.5, 1.0]) is False
    assert exercises.check("E2", "dpo", "dpo") is True


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


def test_rpo_lib_never_imports_trl():
    # TRL is a test dependency (the parity test); the library must work without it.
    for path in (ROOT / "rpo_lib").glob("*.py"):
        assert not re.search(r"^\s*(import trl|from trl)", path.read_text(), re.M), path.name
