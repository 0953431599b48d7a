"""Execute the workbook's notebooks headless and write them, executed and as HTML, to build/.

    python scripts/build_workbook.py notebooks/*.ipynb            # what `make workbook` runs
    python scripts/build_workbook.py --store-checked-outputs ...  # refresh the outputs nbval compares

Fast or full size follows RPO_FAST (see rpo_lib.env). Every notebook is run even if an earlier one fails;
the exit status is non-zero if any failed. Run times go to the screen and to build/timings.json.

``--store-checked-outputs`` writes back into notebooks/ the outputs of cells marked
``# NBVAL_CHECK_OUTPUT`` (what ``pytest --nbval-lax`` compares) and clears every other output, so the
sources stay small and their diffs readable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
CHECK_MARK = "NBVAL_CHECK_OUTPUT"


def execute(path: Path, timeout: int) -> tuple[nbformat.NotebookNode, float, str | None]:
    """Run one notebook in its own folder; return it executed, the seconds it took, and an error or None."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as failure:
        error = str(failure).strip().splitlines()[-1]
    return notebook, time.perf_counter() - start, error


def store_checked_outputs(path: Path, executed: nbformat.NotebookNode) -> None:
    source = nbformat.read(path, as_version=4)
    for cell, ran in zip(source.cells, executed.cells, strict=True):
        if cell.cell_type != "code":
            continue
        if CHECK_MARK in cell.source:
            cell.outputs = ran.outputs
            cell.execution_count = ran.execution_count
        else:
            cell.outputs, cell.execution_count = [], None
    nbformat.write(source, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--store-checked-outputs", action="store_true")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    mode = "fast" if os.environ.get("RPO_FAST", "") in {"1", "true", "yes", "on"} else "full"
    (BUILD / "notebooks").mkdir(parents=True, exist_ok=True)
    (BUILD / "html").mkdir(parents=True, exist_ok=True)
    print(f"Executing {len(args.notebooks)} notebook(s) in {mode} mode (RPO_FAST={os.environ.get('RPO_FAST', '')!r})")
    timings, failures = {}, []
    exporter = HTMLExporter()
    for path in args.notebooks:
        path = path.resolve()
        print(f"  running {path.name}", flush=True)
        executed, seconds, error = execute(path, args.timeout)
        timings[path.name] = round(seconds, 1)
        nbformat.write(executed, BUILD / "notebooks" / path.name)
        html, _ = exporter.from_notebook_node(executed)
        (BUILD / "html" / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
        if error:
            failures.append(path.name)
            print(f"  {path.name} FAILED after {seconds:.1f} s: {error}", flush=True)
        else:
            print(f"  {path.name} done in {seconds:.1f} s", flush=True)
            if args.store_checked_outputs:
                store_checked_outputs(path, executed)
    record = {"mode": mode, "cpu_threads": os.cpu_count(), "seconds": timings}
    (BUILD / "timings.json").write_text(json.dumps(record, indent=2) + "\n")

    width = max(map(len, timings))
    print(f"\nRun times ({mode} mode, {os.cpu_count()} CPU threads):")
    for name, seconds in timings.items():
        print(f"  {name:<{width}}  {seconds:7.1f} s{'  FAILED' if name in failures else ''}")
    print(f"  {'total':<{width}}  {sum(timings.values()):7.1f} s")
    print(f"\nHTML pages:          {BUILD / 'html'}/")
    print(f"Executed notebooks:  {BUILD / 'notebooks'}/")
    print(f"Timings:             {BUILD / 'timings.json'}")
    if failures:
        print(f"\n{len(failures)} notebook(s) failed: {', '.join(failures)}; open the HTML page to see the error.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
