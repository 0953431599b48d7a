"""How the library reports: one ``logging`` logger per module under ``"rpo_lib"``, shown on the screen by default.

The library never calls ``print`` for what it notices (dropped rows, a checkpoint it skips, a schedule that
follows a new length); it logs, and returns objects for everything a caller may want to use. So that a notebook
user sees those messages without configuring anything, the ``"rpo_lib"`` logger has one handler that writes
``rpo_lib.<module>: <message>`` lines at level INFO and above to the *current* ``sys.stdout`` (a notebook's or
pytest's captured stream included), and does not pass them on to the root logger (no double lines when an
application configures logging too). Change that with the standard library::

    import logging
    logging.getLogger("rpo_lib").setLevel(logging.WARNING)     # quieter: only warnings
    rpo_lib.log.to_root()                                      # your own logging set-up shows them instead
"""

from __future__ import annotations

import logging
import sys

__all__ = ["HANDLER", "get_logger", "to_root"]


class _CurrentStdout(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stdout`` is when a record arrives (Jupyter and pytest
    swap it), not the stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


HANDLER = _CurrentStdout()
HANDLER.setFormatter(logging.Formatter("%(name)s: %(message)s"))
_ROOT = logging.getLogger("rpo_lib")
if not any(isinstance(handler, _CurrentStdout) for handler in _ROOT.handlers):  # a reload adds no second one
    _ROOT.addHandler(HANDLER)
_ROOT.setLevel(logging.INFO)
_ROOT.propagate = False


def get_logger(module: str) -> logging.Logger:
    """The logger of ``module`` (its ``__name__``): ``rpo_lib.train.trainer`` logs as ``rpo_lib.train``."""
    parts = module.split(".")
    return logging.getLogger(".".join(parts[:2]) if parts[0] == "rpo_lib" else module)


def to_root() -> None:
    """Hand the library's messages to the root logger's handlers (``logging.basicConfig`` etc.) instead."""
    _ROOT.removeHandler(HANDLER)
    _ROOT.propagate = True
