"""Helpers the test files share (pytest puts tests/ on the import path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_file(relative_path: str) -> ModuleType:
    """Import a script that is not a package module (``scripts/x.py``, ``benchmarks/y.py``) by its path from the
    repository root; it is registered in ``sys.modules`` under its stem, as dataclasses in it need."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
