"""Execute the workbook's notebooks headless and write them, executed and as HTML, to build/.

    python scripts/build_workbook.py notebooks/*.ipynb            # what `make workbook` runs
    python scripts/build_workbook.py --store-checked-outputs ...  # refresh the outputs nbval compares

Fast or full size follows RPO_FAST (see rpo_lib.env). Every notebook is run even if an earlier one fails;
the exit status is non-zero if any failed. Run times go to the screen and to build/timings.json.

The pages typeset formulas without a network: every build copies MathJax 2.7 (the pinned package
jupyter-server-mathjax ships it) into build/html/mathjax/ and the pages load it from there by a relative path,
so build/html/ can be copied anywhere and opened offline. ``--no-execute`` writes the pages from the notebooks
as stored, without running them (seconds; a quick look at the prose and formulas).
scripts/check_offline_page.py opens a page in a headless browser with the network off and checks the formulas.

``--store-checked-outputs`` writes back into notebooks/ the outputs of cells marked
``# NBVAL_CHECK_OUTPUT`` (what ``pytest --nbval-lax`` compares) and clears every other output, so the
sources stay small and their diffs readable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

# MathJax for the pages, from PyPI: jupyter-server-mathjax ships MathJax 2.7.9 (the classic notebook's copy: TeX
# input, HTML-CSS output, STIX-Web fonts). The same pin is in pyproject.toml's dev extra and environment.yml.
MATHJAX_PACKAGE = "jupyter-server-mathjax==0.2.6"
MATHJAX_FOLDER = "mathjax"  # next to the pages: build/html/mathjax/
# The workbook's own MathJax settings, loaded after the combined configuration: the only web font shipped is
# STIX-Web (MathJax's default, TeX, is not), and nothing may be fetched from a CDN.
MATHJAX_LOCAL_CONFIG = "local/rpo-workbook"
MATHJAX_LOCAL_CONFIG_JS = f"""\
/* The RPO workbook's MathJax settings (written by scripts/build_workbook.py): use the STIX-Web fonts shipped
   in this folder, never image fonts or fonts from a CDN. */
MathJax.Hub.Config({{
  "HTML-CSS": {{availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null,
               linebreaks: {{automatic: true}}}},
  menuSettings: {{renderer: "HTML-CSS"}}
}});
MathJax.Ajax.loadComplete("[MathJax]/config/{MATHJAX_LOCAL_CONFIG}.js");
"""
# Relative to the page: the pages and their mathjax/ folder move together.
MATHJAX_URL = f"{MATHJAX_FOLDER}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe,{MATHJAX_LOCAL_CONFIG}"


def mathjax_source() -> Path:
    """The folder of the installed MathJax (the one holding MathJax.js), from the jupyter-server-mathjax package.

    Raises SystemExit with the command to run when the package is missing.
    """
    try:
        import jupyter_server_mathjax
    except ImportError as missing:
        raise SystemExit(f"The pages need MathJax from the package {MATHJAX_PACKAGE}, which is not installed. "
                         f"Run `make install` (or `pip install {MATHJAX_PACKAGE}`).") from missing
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    if not (static / "MathJax.js").is_file():
        raise SystemExit(f"{static} holds no MathJax.js: the package is broken or of another version. Reinstall it: "
                         f"pip install --force-reinstall {MATHJAX_PACKAGE}")
    return static


def install_mathjax(html_dir: Path) -> Path:
    """Copy MathJax and the workbook's MathJax settings into ``html_dir/mathjax/``; return that folder.

    A copy left by an earlier build is replaced, so the folder always matches the installed package.
    """
    target = html_dir / MATHJAX_FOLDER
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(mathjax_source(), target)
    config = target / "config" / f"{MATHJAX_LOCAL_CONFIG}.js"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(MATHJAX_LOCAL_CONFIG_JS, encoding="utf-8")
    return target


def html_exporter() -> HTMLExporter:
    """nbconvert's HTML exporter, with MathJax loaded from ``mathjax/`` next to the page instead of a CDN."""
    return HTMLExporter(mathjax_url=MATHJAX_URL)


def write_page(notebook: nbformat.NotebookNode, page: Path, exporter: HTMLExporter | None = None) -> Path:
    """Write one notebook as an HTML page. The page's folder needs ``install_mathjax`` for its formulas."""
    html, _ = (exporter or html_exporter()).from_notebook_node(notebook)
    page.write_text(html, encoding="utf-8")
    return page


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
    parser.add_argument("--no-execute", action="store_true",
                        help="only write the HTML pages, from the notebooks as stored (nothing is run)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    parser.add_argument("--build-dir", type=Path, default=BUILD, help="where to write (default: build/)")
    args = parser.parse_args(argv)
    build = args.build_dir
    if args.no_execute and args.store_checked_outputs:
        parser.error("--store-checked-outputs needs the notebooks run: drop --no-execute")
    html_dir = build / "html"
    html_dir.mkdir(parents=True, exist_ok=True)
    install_mathjax(html_dir)
    exporter = html_exporter()
    if args.no_execute:
        for path in args.notebooks:
            page = write_page(nbformat.read(path, as_version=4), html_dir / path.with_suffix(".html").name, exporter)
            print(f"  {page.name}: written from the stored {path.name} (not run)")
        print(f"\nHTML pages:          {html_dir}/  (MathJax in {html_dir / MATHJAX_FOLDER}/)")
        return 0

    mode = "fast" if os.environ.get("RPO_FAST", "") in {"1", "true", "yes", "on"} else "full"
    (build / "notebooks").mkdir(parents=True, exist_ok=True)
    print(f"Executing {len(args.notebooks)} notebook(s) in {mode} mode (RPO_FAST={os.environ.get('RPO_FAST', '')!r})")
    timings, failures = {}, []
    for path in args.notebooks:
        path = path.resolve()
        print(f"  running {path.name}", flush=True)
        executed, seconds, error = execute(path, args.timeout)
        timings[path.name] = round(seconds, 1)
        nbformat.write(executed, build / "notebooks" / path.name)
        write_page(executed, html_dir / path.with_suffix(".html").name, exporter)
        if error:
            failures.append(path.name)
            print(f"  {path.name} FAILED after {seconds:.1f} s: {error}", flush=True)
        else:
            print(f"  {path.name} done in {seconds:.1f} s", flush=True)
            if args.store_checked_outputs:
                store_checked_outputs(path, executed)
    record = {"mode": mode, "cpu_threads": os.cpu_count(), "seconds": timings}
    (build / "timings.json").write_text(json.dumps(record, indent=2) + "\n")

    width = max(map(len, timings))
    print(f"\nRun times ({mode} mode, {os.cpu_count()} CPU threads):")
    for name, seconds in timings.items():
        print(f"  {name:<{width}}  {seconds:7.1f} s{'  FAILED' if name in failures else ''}")
    print(f"  {'total':<{width}}  {sum(timings.values()):7.1f} s")
    print(f"\nHTML pages:          {html_dir}/  (MathJax in {html_dir / MATHJAX_FOLDER}/)")
    print(f"Executed notebooks:  {build / 'notebooks'}/")
    print(f"Timings:             {build / 'timings.json'}")
    if failures:
        print(f"\n{len(failures)} notebook(s) failed: {', '.join(failures)}; open the HTML page to see the error.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
