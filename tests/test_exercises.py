"""Every exercise accepts its right answer and rejects wrong ones, and no notebook check cell holds an answer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rpo_lib import bandit, exercises
from rpo_lib.exercises import EXERCISES, Exercise, Implementation, check, check_implementation

ROOT = Path(__file__).resolve().parents[1]


class _History:
    def __init__(self, values):
        self.values = values

    def series(self, key):
        return list(range(len(self.values[key]))), self.values[key]

    def last(self, key):
        return self.values[key][-1]


CONTEXT = {
    "02.E2": {"world": bandit.tabular_world(0, n_responses=8, n_covered=8)},
    "07.E2": {"histories": {("dpo", 0): _History({"eval/logps/chosen": [-10.0, -12.5, -14.0]})}},
    "07.E3": {"histories": {(m, 0): _History({"gold/decoy_mass": [0.1, v]})
                            for m, v in (("dpo", 0.4), ("rpo", 0.01), ("hypo", 0.05))},
              "methods": ("dpo", "rpo", "hypo")},
}


def _wrong(value):
    if isinstance(value, str):
        return "something else"
    value = torch.as_tensor(value, dtype=torch.float64)
    return torch.where(value.isinf(), torch.ones_like(value), value + 0.5)


@pytest.mark.parametrize("name", sorted(k for k, v in EXERCISES.items() if isinstance(v, Exercise)))
def test_answer_exercise_accepts_the_answer_and_rejects_others(name, capsys):
    context = CONTEXT.get(name, {})
    expected = EXERCISES[name].expected(**context)
    assert check(name, expected, **context)
    if isinstance(expected, str):
        assert check(name, f"  {expected.upper()} ", **context)  # case and spaces do not matter
    assert not check(name, _wrong(expected), **context)
    assert not check(name, None, **context)
    printed = capsys.readouterr().out
    assert "not answered yet" in printed and "Hint:" in printed
    if not isinstance(expected, str):  # a wrong answer is told its own value and a hint, not the answer
        wrong_line = [line for line in printed.splitlines() if "not yet" in line][0]
        shown = re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", wrong_line.split("Hint:")[0])
        assert all(abs(float(s) - float(torch.as_tensor(expected).flatten()[0])) > 1e-3 for s in shown
                   if s not in name)


@pytest.mark.parametrize("name", sorted(k for k, v in EXERCISES.items() if isinstance(v, Implementation)))
def test_implementation_exercise_accepts_the_library_and_rejects_a_wrong_function(name, capsys):
    spec = EXERCISES[name]
    assert check_implementation(name, spec.reference)
    assert not check_implementation(name, lambda *args: spec.reference(*args) * 1.01 + 0.01)
    assert not check_implementation(name, None)
    assert not check_implementation(name, lambda *args: 1 / 0)  # the learner's error is reported, not raised
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_a_naive_bt_loss_fails_the_stability_exercise():
    assert not check_implementation("01.I1", lambda c, r: -torch.log(torch.sigmoid(c - r)).mean())


def test_every_notebook_has_an_implementation_exercise():
    numbers = {name.split(".")[0] for name, spec in EXERCISES.items() if isinstance(spec, Implementation)}
    notebooks = {path.name[:2] for path in (ROOT / "notebooks").glob("0*.ipynb")}
    assert notebooks <= numbers


def _code_cells():
    for path in sorted((ROOT / "notebooks").glob("0*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                yield path.name, "".join(cell["source"])


def test_no_check_cell_holds_its_answer():
    """Checks name the exercise and pass the learner's answer (and context), nothing else: no expected value,
    no 'solution' cell that asserts the answer."""
    calls = 0
    for name, source in _code_cells():
        assert "(solution)" not in source, name
        for match in re.finditer(r"\bcheck(?:_implementation)?\((.*?)\)\s*;?\s*$", source, flags=re.M | re.S):
            arguments = [a.strip() for a in match.group(1).split(",")]
            calls += 1
            assert re.fullmatch(r'"0\d\.[EI]\d"', arguments[0]), (name, arguments)
            assert re.fullmatch(r"(answer|implement)_\w+", arguments[1]), (name, arguments)
            assert all(re.fullmatch(r"\w+=\w+", a) for a in arguments[2:]), (name, arguments)
    assert calls >= 30


def test_exercise_ids_used_in_notebooks_exist():
    used = {m for _, source in _code_cells() for m in re.findall(r'check(?:_implementation)?\("(0\d\.[EI]\d)"', source)}
    assert used == set(EXERCISES)


def test_tolerances_are_stated():
    for name, spec in EXERCISES.items():
        assert spec.atol > 0 or spec.rtol > 0, name
    assert isinstance(exercises.__doc__, str) and "tolerance" in exercises.__doc__


def test_a_shard_that_divides_by_its_own_token_count_fails_the_global_normalisation_exercise():
    from rpo_lib.losses import sft_loss

    assert not check_implementation("09.I1", lambda logps, mask, tokens: sft_loss(logps, mask,
                                                                                normalization="token_mean"))
