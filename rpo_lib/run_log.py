"""Runs you can watch: the trainer's history written as it grows, to TensorBoard event files and a JSON-lines file.

``TrainConfig(report_to=("tensorboard", "jsonl"), log_dir="runs/rpo")`` writes, from the main process only:

- ``events.out.tfevents.*`` (``"tensorboard"``): every logged metric at its step (``loss``, ``rewards/margins``,
  ``logps/chosen``, evaluations, ...), and the config as hyper-parameters (the HParams tab). Watch a run live with
  ``tensorboard --logdir runs``.
- ``log.jsonl`` (``"jsonl"``): a first line ``{"config": {...}}``, then one object per step, as in ``History``;
  ``pandas.read_json("log.jsonl", lines=True)`` reads it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPORT_TARGETS", "RunLog"]

REPORT_TARGETS = ("tensorboard", "jsonl")


def _plain(value: Any) -> Any:
    """A JSON- and HParams-friendly value: numbers, text and booleans as they are, anything else as text."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


class RunLog:
    """Writes each history row as it comes (``write``), to the targets of ``report_to``; ``close`` flushes."""

    def __init__(self, directory: str | os.PathLike, targets: Sequence[str], config: Mapping[str, Any]) -> None:
        unknown = sorted(set(targets) - set(REPORT_TARGETS))
        if unknown:
            raise ValueError(f"report_to: unknown target(s) {unknown}; choose among {list(REPORT_TARGETS)}.")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = {key: _plain(value) for key, value in config.items()}
        self._jsonl = None
        self._writer = None
        if "jsonl" in targets:
            self._jsonl = open(self.directory / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115  # closed in close()
            self._jsonl.write(json.dumps({"config": self.config}) + "\n")
            self._jsonl.flush()
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
                from torch.utils.tensorboard.summary import hparams
            except ImportError as error:
                raise ImportError("report_to=('tensorboard',) needs the tensorboard package: pip install "
                                  "tensorboard==2.20.0 (pyproject.toml pins it).") from error
            self._writer = SummaryWriter(log_dir=str(self.directory))
            # The config as hyper-parameters in the same event file (add_hparams would open a second run).
            values = {key: value for key, value in self.config.items() if value is not None}
            for summary in hparams(values, {}):
                self._writer.file_writer.add_summary(summary)

    def write(self, row: Mapping[str, Any]) -> None:
        """One history row: ``{"step": n, name: value, ...}``."""
        step = int(row["step"])
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({key: _plain(value) for key, value in row.items()}) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
