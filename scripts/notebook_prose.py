"""How much prose the notebooks carry: per notebook, the markdown cells, their average words, and the cells
that hold more than one heading.

    python scripts/notebook_prose.py                      # every notebook in notebooks/
    python scripts/notebook_prose.py notebooks/07_*.ipynb

A word is a run of characters between spaces, with code spans, LaTeX and link targets counted as they are
written (a formula is a few words, not none). tests/test_notebook_prose.py holds the bound.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^#{1,6}\s", re.M)


def _markdown_sources(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def _headings(source: str) -> int:
    """Headings outside fenced code blocks (a '# comment' inside ``` is code, not a heading)."""
    outside = re.sub(r"^```.*?^```", "", source, flags=re.M | re.S)
    return len(HEADING.findall(outside))


def prose(path: Path) -> dict:
    """The markdown cell count, the average words per markdown cell, the longest cell's words, and the indices
    (among markdown cells) of cells with two or more headings."""
    sources = _markdown_sources(path)
    words = [len(s.split()) for s in sources]
    return {
        "notebook": path.name,
        "markdown_cells": len(sources),
        "words_per_cell": sum(words) / len(words) if words else 0.0,
        "longest_cell": max(words, default=0),
        "multi_heading_cells": [i for i, s in enumerate(sources) if _headings(s) > 1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    rows = [prose(p) for p in paths]
    width = max(len(r["notebook"]) for r in rows)
    print(f"{'notebook':<{width}}  md cells  words/cell  longest  cells with 2+ headings")
    for r in rows:
        print(f"{r['notebook']:<{width}}  {r['markdown_cells']:8d}  {r['words_per_cell']:10.1f}  "
              f"{r['longest_cell']:7d}  {len(r['multi_heading_cells'])}")
    total_cells = sum(r["markdown_cells"] for r in rows)
    total_words = sum(r["markdown_cells"] * r["words_per_cell"] for r in rows)
    print(f"{'all':<{width}}  {total_cells:8d}  {total_words / max(total_cells, 1):10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
