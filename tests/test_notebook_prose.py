"""The notebooks' prose stays light: short markdown cells, one heading per cell (scripts/notebook_prose.py)."""

import json
from pathlib import Path

import pytest
from helpers import load_file

ROOT = Path(__file__).resolve().parents[1]
notebook_prose = load_file("scripts/notebook_prose.py")

# Words per markdown cell, on average (rasbt's DPO notebook: about 47). Before issue 22 the notebooks averaged 70-138
# (109 over the workbook); after it 41-64, 58 over the workbook. A cell is one heading, one paragraph, one takeaway.
# The GPU notebooks (08, 09) carry the most caveats per cell, hence the looser bound per notebook.
MAX_WORDS_PER_CELL = 65  # any one notebook
MAX_WORDS_PER_CELL_OVERALL = 60  # all notebooks' markdown cells together
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_markdown_cells_are_short_and_hold_one_heading(path):
    row = notebook_prose.prose(path)
    assert row["words_per_cell"] <= MAX_WORDS_PER_CELL, (
        f"{path.name}: {row['words_per_cell']:.1f} words per markdown cell (at most {MAX_WORDS_PER_CELL}): split "
        f"long cells at their natural breaks, or cut repetition")
    assert not row["multi_heading_cells"], (
        f"{path.name}: markdown cells {row['multi_heading_cells']} (counted among markdown cells) hold more than one "
        f"heading: split each at its second heading")


def test_the_workbook_as_a_whole_is_light():
    rows = [notebook_prose.prose(path) for path in NOTEBOOKS]
    cells = sum(row["markdown_cells"] for row in rows)
    words = sum(row["markdown_cells"] * row["words_per_cell"] for row in rows)
    assert words / cells <= MAX_WORDS_PER_CELL_OVERALL, f"{words / cells:.1f} words per markdown cell over the workbook"


def _notebook(tmp_path, *sources):
    cells = [{"cell_type": "markdown", "id": f"{i:08x}", "metadata": {}, "source": [s]} for i, s in enumerate(sources)]
    path = tmp_path / "check.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_the_measure_fails_a_wordy_notebook_and_a_cell_with_two_headings(tmp_path):
    wordy = _notebook(tmp_path, "## 1. A section\n\n" + "word " * 200, "**Takeaway:** short.")
    row = notebook_prose.prose(wordy)
    assert row["words_per_cell"] > MAX_WORDS_PER_CELL and row["multi_heading_cells"] == []
    two = _notebook(tmp_path, "**Takeaway:** short.\n\n## 2. Next\n\n### 2.1 And a sub-section\ntext")
    assert notebook_prose.prose(two)["multi_heading_cells"] == [0]
    fenced = _notebook(tmp_path, "## 3. Code in markdown\n\n```python\n# a comment, not a heading\nx = 1\n```")
    assert notebook_prose.prose(fenced)["multi_heading_cells"] == []
