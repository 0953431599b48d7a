"""Open built workbook pages in a headless browser with the network off and check that MathJax typeset them.

    python scripts/check_offline_page.py                          # every page in build/html/
    python scripts/check_offline_page.py build/html/01_bradley_terry.html
    python scripts/build_workbook.py --no-execute notebooks/01_bradley_terry.ipynb   # a page in seconds

The browser is Chromium (on Debian/Ubuntu: `apt-get install chromium-headless-shell`, or `chromium`), or the one
named by --browser. The network is off twice over: the browser runs in a new, empty network namespace
(`unshare -n`) where the system allows it, and always behind a proxy that refuses every connection
(127.0.0.1:9, loopback included). It loads the page from file://, lets MathJax run (virtual time), and dumps
the DOM. A page passes when MathJax ran and typeset every formula it found, shows no MathJax error,
and no raw TeX (`$...$`, `\\(...\\)`, `\\frac`...) is left in the text of its markdown cells. Requests the
browser tried to send to the network are listed (they all failed); require.js, which only the widget views
need, is one of them.

Exit status: 0 if every page passed, 1 if one failed, 2 if no browser was found.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium-headless-shell", "chrome-headless-shell", "chromium", "chromium-browser", "google-chrome",
            "google-chrome-stable")
INSTALL_HINT = ("No headless Chromium found. Install one (Debian/Ubuntu: `apt-get install chromium-headless-shell` "
                "or `apt-get install chromium`) or name it with --browser PATH.")
# Raw TeX that MathJax should have replaced: $...$, $$...$$, \(...\), \[...\], or a TeX command such as \frac.
RAW_TEX = re.compile(r"\$[^$\s][^$]*\$|\\\(|\\\[|\\(?:frac|sum|mathbb|mathcal|log|sigma|beta|pi|left|right)\b")
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def find_browser(name: str | None = None) -> str | None:
    """The path of a headless-capable Chromium: ``name`` if given (a path or a command), else the first found."""
    for candidate in (name,) if name else BROWSERS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def network_namespace_works() -> bool:
    """Whether ``unshare -n`` (a new network namespace with no interfaces but a down loopback) is allowed here."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@dataclass
class PageReport:
    """What the browser made of one page."""

    page: Path
    ran: bool = False                     # MathJax started (it leaves its hidden measuring box in the DOM)
    found: int = 0                        # formulas MathJax 2 found (one math/tex script each)
    typeset: int = 0                      # formulas MathJax rendered (MathJax 2 frames or MathJax 3 containers)
    errors: int = 0                       # formulas MathJax could not render
    raw_tex: list[str] = field(default_factory=list)   # raw TeX left in the markdown cells' text
    blocked: list[str] = field(default_factory=list)   # http(s) requests the browser tried (all failed)
    offline: str = ""                     # how the network was turned off

    @property
    def passed(self) -> bool:
        return self.ran and self.typeset >= self.found and self.errors == 0 and not self.raw_tex

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        started = "MathJax ran" if self.ran else "MathJax never started"
        lines = [f"{verdict} {self.page} ({self.offline}): {started}, found {self.found} formula(s) and typeset "
                 f"{self.typeset}, {self.errors} MathJax error(s), {len(self.raw_tex)} raw TeX fragment(s) left"]
        lines += [f"    raw TeX: {fragment!r}" for fragment in self.raw_tex[:10]]
        lines += [f"    blocked request: {url}" for url in self.blocked]
        return "\n".join(lines)


class _MarkdownText(HTMLParser):
    """Collects the visible text of the rendered markdown cells (no scripts, styles or MathJax previews)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, inside markdown, hidden)
        self.chunks: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            return
        classes = (dict(attrs).get("class") or "").split()
        markdown, hidden = self.stack[-1][1:] if self.stack else (False, False)
        markdown = markdown or "jp-RenderedMarkdown" in classes or "jp-MarkdownOutput" in classes
        hidden = hidden or tag in {"script", "style"} or "MathJax_Preview" in classes
        self.stack.append((tag, markdown, hidden))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed tags
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1][1] and not self.stack[-1][2]:
            self.chunks.append(data)


def analyse(dom: str, page: Path) -> PageReport:
    """Count MathJax's output in a dumped DOM and find raw TeX left in the markdown cells."""
    report = PageReport(page)
    report.ran = 'id="MathJax_Hidden"' in dom or 'id="MJX-CHTML-styles"' in dom or 'id="MJX-SVG-styles"' in dom
    # MathJax 2 turns each formula into a <script type="math/tex" id="MathJax-Element-N"> and, once typeset,
    # puts its output (HTML-CSS, SVG or CommonHTML) in a frame with id MathJax-Element-N-Frame. MathJax 3 puts
    # each formula in an <mjx-container>.
    report.found = len(re.findall(r'<script type="math/[^"]*" id="MathJax-Element-\d+"', dom))
    report.typeset = len(re.findall(r'id="MathJax-Element-\d+-Frame"', dom)) + dom.count("<mjx-container")
    report.errors = len(re.findall(r'class="[^"]*\b(?:merror|MathJax_Error|mjx-merror)\b', dom))
    parser = _MarkdownText()
    parser.feed(dom)
    report.raw_tex = RAW_TEX.findall("".join(parser.chunks))
    return report


def _requests_in_net_log(path: Path) -> list[str]:
    """The http(s) URLs in a Chromium NetLog (file:// loads are not logged there)."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace").rstrip().rstrip(",")
    try:
        events = json.loads(text if text.endswith("}") else text + "]}")["events"]
    except (json.JSONDecodeError, KeyError):
        return sorted(set(re.findall(r'"url":"(https?://[^"]+)"', text)))
    return sorted({event["params"]["url"] for event in events
                   if str(event.get("params", {}).get("url", "")).startswith(("http://", "https://"))})


def check_page(page: Path, browser: str, *, budget_ms: int = 30_000, timeout: float = 120.0,
               namespace: bool | None = None) -> PageReport:
    """Open ``page`` in ``browser`` with the network off, let MathJax run for ``budget_ms`` of virtual time,
    and report what it typeset. ``namespace``: use ``unshare -n`` (default: where the system allows it)."""
    page = page.resolve()
    if not page.is_file():
        raise FileNotFoundError(f"No page at {page}: build one with `python scripts/build_workbook.py --no-execute "
                                f"notebooks/01_bradley_terry.ipynb` (or `make workbook`).")
    namespace = network_namespace_works() if namespace is None else namespace
    with tempfile.TemporaryDirectory(prefix="offline-page-") as scratch:
        net_log = Path(scratch) / "net-log.json"
        command = ["unshare", "-n"] if namespace else []
        command += [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    f"--user-data-dir={scratch}/profile", "--proxy-server=127.0.0.1:9",
                    "--proxy-bypass-list=<-loopback>",
                    f"--virtual-time-budget={budget_ms}", f"--log-net-log={net_log}", "--dump-dom", page.as_uri()]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0 or "<html" not in result.stdout.lower():
            raise RuntimeError(f"{browser} failed on {page} (exit status {result.returncode}); its last words:\n"
                               + "\n".join(result.stderr.strip().splitlines()[-10:]))
        report = analyse(result.stdout, page)
        report.blocked = _requests_in_net_log(net_log)
    report.offline = ("empty network namespace (unshare -n) + " if namespace else "") + "proxy refusing everything"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="HTML pages (default: every page in build/html/)")
    parser.add_argument("--browser", help=f"Chromium or Chrome to use (default: the first of {', '.join(BROWSERS)})")
    parser.add_argument("--budget-ms", type=int, default=30_000, help="virtual time MathJax gets to typeset")
    args = parser.parse_args(argv)

    browser = find_browser(args.browser)
    if browser is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    pages = args.pages or sorted((ROOT / "build" / "html").glob("*.html"))
    if not pages:
        print("No pages in build/html/: run `make workbook`, or `python scripts/build_workbook.py --no-execute "
              "notebooks/*.ipynb` for pages of the stored notebooks.", file=sys.stderr)
        return 1
    reports = [check_page(page, browser, budget_ms=args.budget_ms) for page in pages]
    for report in reports:
        print(report.summary())
    failed = [r for r in reports if not r.passed]
    print(f"\n{len(reports) - len(failed)} of {len(reports)} page(s) typeset offline" + (
        "" if not failed else f"; failed: {', '.join(r.page.name for r in failed)}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
