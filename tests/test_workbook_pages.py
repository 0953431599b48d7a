"""The HTML pages of `make workbook` (scripts/build_workbook.py) typeset their formulas without a network.

The structural test builds one small notebook's page (nothing executed) and checks that MathJax comes from the
build folder, not a CDN. The browser test opens that page in headless Chromium with the network off
(scripts/check_offline_page.py); it skips where no Chromium is installed.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import nbformat
import pytest
from helpers import load_file

ROOT = Path(__file__).resolve().parents[1]
FORMULAS = ("$P(y_1 \\succ y_0 \\mid x) = \\sigma\\big(r^\\star(x, y_1) - r^\\star(x, y_0)\\big)$",
            "$$\\mathcal{L} = -\\log \\sigma\\Big(\\beta \\log \\frac{\\pi(y^+)}{\\pi_{ref}(y^+)}\\Big)$$")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """build/html/ of `build_workbook.py --no-execute` for one small notebook (prose with formulas, a stored
    output), in a temporary build folder; the page's path."""
    build_workbook = load_file("scripts/build_workbook.py")
    folder = tmp_path_factory.mktemp("workbook")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell(f"# A page\n\nThe BT model, {FORMULAS[0]}, and the DPO loss\n\n{FORMULAS[1]}"),
        nbformat.v4.new_code_cell("print(0.7858)", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="0.7858\n")], execution_count=1)])
    nbformat.write(notebook, folder / "small.ipynb")
    assert build_workbook.main(["--no-execute", "--build-dir", str(folder / "build"), str(folder / "small.ipynb")]) == 0
    return folder / "build" / "html" / "small.html"


class _Assets(HTMLParser):
    """The src of every <script> and the href of every <link rel=stylesheet> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(found["src"])
        elif tag == "link" and "stylesheet" in (found.get("rel") or "") and found.get("href"):
            self.urls.append(found["href"])


def test_pages_load_mathjax_from_the_build_folder(page: Path):
    html = page.read_text(encoding="utf-8")
    assert FORMULAS[0] in html  # the TeX is in the page, for MathJax to typeset
    assets = _Assets()
    assets.feed(html)
    mathjax = [url for url in assets.urls if "mathjax" in url.lower()]
    assert mathjax, f"the page loads no MathJax at all: {assets.urls}"
    on_the_network = [url for url in mathjax if re.match(r"(?i)([a-z][a-z0-9+.-]*:)?//", url)]
    assert not on_the_network, f"MathJax comes from the network, not build/html/mathjax/: {on_the_network}"
    # No CDN MathJax anywhere in the page either (e.g. a loader written inside an inline script).
    assert not [u for u in re.findall(r"https?://[^\s\"'<>)]+", html) if "mathjax" in u.lower()]

    for url in mathjax:  # a relative path: build/html/ works wherever it is copied
        parts = urlsplit(url)
        assert not parts.path.startswith("/"), f"{url} is an absolute path: the pages could not be moved"
        script = page.parent / parts.path
        assert script.is_file(), f"{url} points at {script}, which does not exist"
        for config in parse_qs(parts.query).get("config", [""])[0].split(","):
            assert (script.parent / "config" / f"{config}.js").is_file(), f"MathJax config {config!r} is missing"
    folder = page.parent / "mathjax"
    local_config = (folder / "config" / "local" / "rpo-workbook.js").read_text()
    assert 'webFont: "STIX-Web"' in local_config and "imageFont: null" in local_config
    assert len(list((folder / "fonts" / "HTML-CSS" / "STIX-Web" / "woff").glob("*.woff"))) > 20
    assert (folder / "jax" / "output" / "HTML-CSS" / "fonts" / "STIX-Web" / "fontdata.js").is_file()


def test_the_mathjax_package_is_the_pinned_one():
    """build_workbook names the pin of pyproject.toml's dev extra, and that version is installed."""
    package = load_file("scripts/build_workbook.py").MATHJAX_PACKAGE
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert package in dev
    name, version = package.split("==")
    assert importlib.metadata.version(name) == version


def test_a_moved_page_typesets_its_formulas_in_a_browser_without_network(page: Path, tmp_path: Path):
    """The built html/ folder, copied elsewhere, opened in headless Chromium with the network off."""
    check = load_file("scripts/check_offline_page.py")
    browser = check.find_browser()
    if browser is None:
        pytest.skip(check.INSTALL_HINT)
    moved = tmp_path / "copied"
    shutil.copytree(page.parent, moved)
    report = check.check_page(moved / page.name, browser)
    assert report.passed, report.summary()
    assert report.ran and report.typeset == report.found == len(FORMULAS)
    assert not [url for url in report.blocked if "mathjax" in url.lower()]
