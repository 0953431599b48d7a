"""Checkpoint files of ``rpo_lib.train``: atomic writes, discovery by step, safe loading, an intact fallback.

A checkpoint is one file, ``checkpoint-<step>.pt`` (the step zero-padded to six digits, longer when needed),
holding plain data only: tensors, numbers, strings, lists, tuples and dicts. It is

- **written atomically**: to ``<name>.tmp``, flushed and fsynced, then renamed over the final name, so an
  interruption (Ctrl-C, a crash, a full disk) never leaves a half-written file under a checkpoint's name;
- **found by its step**, parsed from the name, never by sorting names (``checkpoint-1000000.pt`` is newer than
  ``checkpoint-999999.pt``); ``.tmp`` files and other names are ignored;
- **loaded safely**: ``torch.load(..., weights_only=True)``, torch's restricted unpickler, which refuses any
  Python object other than the plain data above. A checkpoint file can therefore not run code when it is
  loaded, wherever it came from (a file written by ``torch.save`` of arbitrary objects is refused with an
  error that says so). Such files are safe to receive from others; what they contain still decides what your
  model learns, so resume only from runs you know.

``read`` turns every way a file can be unusable (truncated, empty, not a torch file, unsafe, written by an
older format) into a ``CheckpointError`` that names the file and says what is wrong; ``newest_readable``
walks back from the newest file to the newest one that reads, and reports the ones it skipped.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "CheckpointError", "checkpoint_files", "checkpoint_name", "latest_checkpoint",
           "newest_readable", "read", "remove_checkpoints", "rotate", "write_atomic"]

FORMAT = 2  # format 1 (rpo_lib 0.1) pickled numpy RNG states and cannot be loaded with weights_only=True
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
_REQUIRED = ("format", "step", "weights", "optimizer", "scheduler", "history", "rng", "run")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; ``str()`` names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}.pt"


def checkpoint_files(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, oldest first (by parsed step)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint file with the highest step in ``directory`` (temporary files are ignored), or None."""
    files = checkpoint_files(directory)
    return files[-1][1] if files else None


def write_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to ``<path>.tmp``, fsync, then rename onto ``path``: the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure is a ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file.")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes): the write that made it never finished.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
        detail_text = detail.group(1).strip() if detail else text.splitlines()[0][:160]
        if "Unsupported global" in text:
            raise CheckpointError(
                path, f"refused by torch.load(weights_only=True): it holds Python objects, not only tensors and "
                      f"plain data, so loading it could run code ({detail_text}). rpo_lib never writes such files; "
                      f"do not load it.") from error
        problem = f"not a readable checkpoint ({detail_text}); it is truncated or damaged."
        raise CheckpointError(path, problem) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            path, f"not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:160]}); it "
                  f"is truncated or damaged.") from error
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(path, "a torch file, but not an rpo_lib checkpoint (no 'format' entry).")
    if state["format"] != FORMAT:
        raise CheckpointError(path, f"written in checkpoint format {state['format']}, this rpo_lib reads format "
                                    f"{FORMAT}: resume with the rpo_lib version that wrote it, or start afresh.")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(path, f"an incomplete checkpoint: it has no {', '.join(missing)}.")
    return state


def newest_readable(directory: str | os.PathLike) -> tuple[Path, dict[str, Any], list[CheckpointError]]:
    """The newest checkpoint in ``directory`` that ``read`` accepts, its contents, and the errors of the newer
    files it skipped. ``FileNotFoundError`` if there is no checkpoint file; ``CheckpointError`` if none reads."""
    files = checkpoint_files(directory)
    if not files:
        raise FileNotFoundError(f"no checkpoint in {directory}: train without resume to start from the beginning.")
    skipped: list[CheckpointError] = []
    for _, path in reversed(files):
        try:
            return path, read(path), skipped
        except CheckpointError as error:
            skipped.append(error)
    problems = "; ".join(str(error) for error in skipped)
    raise CheckpointError(Path(directory), f"no checkpoint in it can be read: {problems}")


def rotate(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` checkpoints with the highest steps; return what was deleted."""
    files = checkpoint_files(directory)
    doomed = [path for _, path in files[:max(0, len(files) - keep)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def remove_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Delete every checkpoint file (and leftover ``.tmp`` file) of ``directory``; other files are kept."""
    root = Path(directory)
    doomed = [path for _, path in checkpoint_files(root)]
    if root.is_dir():
        doomed += [path for path in root.iterdir() if path.name.endswith(".pt.tmp") and _NAME.match(path.name[:-4])]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
