"""The run-time environment: fast mode, the compute device, versions, and Colab set-up.

Fast mode is the workbook's one switch for smaller experiments: the environment variable ``RPO_FAST=1``
(set by ``make test`` and ``make workbook``). Notebooks and scripts ask for sizes through ``pick`` so that
fast and full runs take the same code path with different numbers.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from contextlib import contextmanager
from functools import wraps
from typing import Callable, Iterator, TypeVar

import torch

from rpo_lib.log import get_logger

__all__ = ["COLAB_SETUP_CELL", "colab_plan", "colab_setup", "device", "environment_report", "fast_mode", "in_colab",
           "install_missing", "missing_requirements", "one_thread", "pick", "print_environment", "single_thread"]

T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
DISTRIBUTION = "rpo-workbook"
log = get_logger(__name__)


def fast_mode() -> bool:
    """True when ``RPO_FAST`` is set to 1/true/yes/on; unset or 0 runs the full-size experiments."""
    value = os.environ.get("RPO_FAST", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"RPO_FAST={value!r} is not understood: set it to 1 for fast mode or 0 (or unset) for full.")


def pick(full: T, fast: T) -> T:
    """``fast`` in fast mode, else ``full``: ``n_pairs = pick(full=10_000, fast=1_000)``."""
    return fast if fast_mode() else full


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block, then restore the previous setting.

    For small tensors (the bandit worlds: tables of a few hundred numbers) a second thread brings nothing and its
    synchronisation costs: with another process busy on a 2-core CPU, the finite-sample experiment of notebook 05
    took 62 s with torch's default 2 threads and 21 s with one (19-22 s either way on an idle machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


F = TypeVar("F", bound=Callable)


def one_thread(function: F) -> F:
    """Decorator form of ``single_thread`` for functions that compute on small CPU tensors."""
    @wraps(function)
    def wrapper(*args, **kwargs):
        with single_thread():
            return function(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def device(prefer: str | None = None) -> torch.device:
    """The device this process should use: the one GPU a launcher gave it (``cuda:LOCAL_RANK`` under accelerate
    or torchrun), else the current CUDA device, else Apple MPS, else the CPU. ``prefer`` forces a type or a device
    ("cpu", "cuda", "cuda:1"); a bare "cuda" also means the launcher's GPU."""
    if prefer is not None:
        chosen = torch.device(prefer)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} was asked for but no CUDA GPU is visible: use 'cpu' or check the "
                             f"driver.")
        if chosen.type != "cuda" or chosen.index is not None:
            return chosen
    if torch.cuda.is_available():
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_REPORTED = ("torch", "transformers", "datasets", "peft", "accelerate", "bitsandbytes", "numpy", "matplotlib",
             "ipywidgets", "tqdm")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    """Python, package versions, device and mode as strings: what to paste into a bug report."""
    chosen = device()
    report = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    report.update({package: _version(package) for package in _REPORTED})
    report["device"] = chosen.type
    if chosen.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        report["gpu memory (GiB)"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
    report["cpu threads"] = str(torch.get_num_threads())
    report["colab"] = str(in_colab())
    report["fast mode (RPO_FAST)"] = str(fast_mode())
    return report


def print_environment() -> None:
    """Print ``environment_report()`` as an aligned table."""
    report = environment_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower()


def _parse(requirements: list[str]) -> list[tuple[str, str, str | None]]:
    """``(requirement, package name, pinned version or None)`` of the runtime requirements (extras skipped)."""
    parsed = []
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        requirement = requirement.split(";")[0].strip()
        pinned = requirement.split("==", 1)[1].strip() if "==" in requirement else None
        parsed.append((requirement, _requirement_name(requirement), pinned))
    return parsed


def missing_requirements(*, only_absent: bool = True) -> list[str]:
    """The workbook's pinned runtime requirements that this environment lacks.

    Read from the installed package's metadata, so pyproject.toml stays the one list. With ``only_absent``
    (the Colab default) a package that is installed at any version counts as present: Colab's own torch,
    numpy and matplotlib are kept rather than replaced by downloads. With ``only_absent=False`` a version
    other than the pin counts as missing too.
    """
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(
            f"the {DISTRIBUTION} distribution is not installed: run `pip install --no-deps -e .` in the "
            f"workbook's folder first."
        ) from error
    missing = []
    for requirement, name, pinned in _parse(requirements):
        installed = _version(name)
        if installed == "not installed":
            missing.append(requirement)
        elif not only_absent and pinned is not None and installed.split("+")[0] != pinned:
            missing.append(requirement)
    return missing


def install_missing(*, only_absent: bool = True) -> list[str]:
    """``pip install`` what ``missing_requirements`` lists (the Colab set-up cell calls this)."""
    missing = missing_requirements(only_absent=only_absent)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    return missing


# ------------------------------------------------------------------------------------------------ Colab
# The first code cell of every notebook (tests/test_packaging.py checks that each one is exactly this). It does
# nothing outside Colab. On Colab it clones only an address the user gives: the workbook has no official
# address that this library could trust on the user's behalf, and a default one that someone else could
# register would run their code in every user's session.
COLAB_SETUP_CELL = """\
# Set-up. On Google Colab this installs the workbook (about 1 minute); everywhere else it does nothing.
# On Colab, set REPO_URL to the git address of the copy of the workbook you opened this notebook from (yours, or
# a fork you have read), or set the environment variable RPO_WORKBOOK_REPO: nothing is cloned without one.
REPO_URL = ""
import os, subprocess, sys
if "google.colab" in sys.modules:
    REPO_URL = REPO_URL or os.environ.get("RPO_WORKBOOK_REPO", "")
    if not REPO_URL:
        raise RuntimeError("Set REPO_URL at the top of this cell to the git address of the rpo-workbook copy you "
                           "opened this notebook from (e.g. https://github.com/<you>/rpo-workbook), then run it again.")
    if not os.path.isdir("/content/rpo-workbook"):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, "/content/rpo-workbook"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "/content/rpo-workbook"],
                   check=True)
    sys.path.insert(0, "/content/rpo-workbook")
    from rpo_lib.env import colab_setup
    colab_setup()  # missing pinned packages (bitsandbytes only on a GPU), version warnings, widgets"""

# Packages whose version matters for the workbook's numbers and APIs; Colab brings its own.
COLAB_CHECKED = ("transformers", "peft", "datasets")


def _pins() -> dict[str, str]:
    return {name: pinned for _, name, pinned in _parse(importlib.metadata.requires(DISTRIBUTION) or [])
            if pinned is not None}


def colab_plan(*, gpu: bool) -> tuple[list[str], list[str]]:
    """What the Colab set-up will do: ``(requirements to install, warnings to print)``.

    Missing requirements are installed at their pins, except ``bitsandbytes`` on a runtime without a GPU (only
    the 4-bit 7B notebooks use it, and they need a GPU). Colab's own torch, numpy and matplotlib are kept;
    where its transformers, peft or datasets differ from the pins, a warning says which version the workbook
    is tested with and how to get it.
    """
    install = missing_requirements()
    warnings = []
    if not gpu and any(_requirement_name(r) == "bitsandbytes" for r in install):
        install = [r for r in install if _requirement_name(r) != "bitsandbytes"]
        warnings.append("bitsandbytes is not installed: this runtime has no GPU, and only the 4-bit notebooks, "
                        "which need one, use it (Runtime > Change runtime type > GPU, then run this cell again).")
    pins = _pins()
    for package in COLAB_CHECKED:
        installed, pinned = _version(package), pins.get(package)
        if pinned and installed != "not installed" and installed.split("+")[0] != pinned:
            warnings.append(f"Colab has {package} {installed}; the workbook is tested with {pinned}. If a cell fails, "
                            f"run `!pip install {package}=={pinned}`, then Runtime > Restart session.")
    return install, warnings


def colab_setup() -> None:
    """The Colab set-up cell's last step: install what ``colab_plan`` lists, print its warnings, enable widgets."""
    install, warnings = colab_plan(gpu=torch.cuda.is_available())
    if install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *install], check=True)
    for warning in warnings:
        log.warning(warning)
    if in_colab():
        from google.colab import output  # type: ignore[import-not-found]

        output.enable_custom_widget_manager()  # ipywidgets 8 sliders


if __name__ == "__main__":  # python -m rpo_lib.env [--install-missing]
    if "--install-missing" in sys.argv:
        print("installed:", install_missing() or "nothing, all requirements were met")
    else:
        print_environment()
