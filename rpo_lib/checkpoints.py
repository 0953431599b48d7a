"""Checkpoint files of ``rpo_lib.train``: atomic writes, discovery by step, safe loading, an intact fallback.

A checkpoint is one file, ``checkpoint-<step>.pt`` (the step zero-padded to six digits, longer when needed),
holding plain data only: tensors, numbers, strings, lists, tuples and dicts. It is

- **written atomically**: to ``<name>.tmp``, flushed and fsynced, then renamed over the final name, so an
  interruption (Ctrl-C, a crash, a full disk) never leaves a half-written file under a checkpoint's name;
- **checksummed**: the SHA-256 of the file's bytes, computed as they are written, goes into ``<name>.sha256``
  (``sha256sum -c`` reads it), written and renamed before the checkpoint itself. ``read`` verifies it: a file whose
  bytes changed after it was written (a bad disk, a partial copy on a shared file system) is refused like a
  truncated one, whichever byte changed. Measured without the checksum: one byte flipped at 20%, 50% or 80% of a
  checkpoint loaded without a word, and training went on from corrupted state;
- **found by its step**, parsed from the name, never by sorting names (``checkpoint-1000000.pt`` is newer than
  ``checkpoint-999999.pt``); ``.tmp`` files and other names are ignored;
- **loaded safely**: ``torch.load(..., weights_only=True)``, torch's restricted unpickler, which refuses any
  Python object other than the plain data above. A checkpoint file can therefore not run code when it is
  loaded, wherever it came from (a file written by ``torch.save`` of arbitrary objects is refused with an
  error that says so). Such files are safe to receive from others; what they contain still decides what your
  model learns, so resume only from runs you know.

``read`` turns every way a file can be unusable (truncated, empty, not a torch file, unsafe, damaged, written by
an older format, without its checksum) into a ``CheckpointError`` that names the file and says what is wrong;
``newest_readable`` walks back from the newest file to the newest one that reads, and reports the ones it skipped.
A checkpoint written before checksums existed can be checked by hand and then given one (``write_checksum``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["FORMAT", "CheckpointError", "checkpoint_files", "checkpoint_name", "checksum_path", "file_sha256",
           "latest_checkpoint", "newest_readable", "read", "remove_checkpoints", "rotate", "write_atomic",
           "write_checksum"]

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


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of checkpoint ``path`` is kept: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """A file object that hashes what is written through it (torch.save writes sequentially, never seeks back)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _write_synced(path: Path, write: Any) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to ``<path>.tmp`` (hashing the bytes as they go), fsync, write ``<path>.sha256`` the same way,
    then rename both into place, the checksum first: under the checkpoint's name there is the old file or the new
    one, never half of one, and never a checkpoint without its checksum. (A crash between the two renames over an
    existing checkpoint of the same step leaves the old file with the new checksum: it is then refused as damaged,
    and resuming falls back to the one before; a checksum whose checkpoint never arrived is removed by ``rotate``.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    digest: dict[str, str] = {}

    def save(handle: BinaryIO) -> None:
        writer = _HashingWriter(handle)
        torch.save(state, writer)  # type: ignore[arg-type]  # a file-like object with write()
        digest["hex"] = writer.sha256.hexdigest()

    _write_synced(temporary, save)
    _write_checksum_file(path, digest["hex"])
    os.replace(temporary, path)
    return path


def _write_checksum_file(path: Path, hex_digest: str) -> None:
    target = checksum_path(path)
    temporary = target.with_name(target.name + ".tmp")
    _write_synced(temporary, lambda handle: handle.write(f"{hex_digest}  {path.name}\n".encode()))
    os.replace(temporary, target)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes, read in chunks of ``chunk`` bytes."""
    sha256 = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            sha256.update(block)
    return sha256.hexdigest()


def write_checksum(path: str | os.PathLike) -> Path:
    """Give checkpoint ``path`` a checksum of its bytes as they are now (for a checkpoint written before rpo_lib
    stored checksums, once you have checked it: ``read(path, verify=False)`` loads it). Returns the checksum file."""
    path = Path(path)
    _write_checksum_file(path, file_sha256(path))
    return checksum_path(path)


def _verify(path: Path) -> None:
    """Raise unless ``path``'s bytes have the SHA-256 recorded beside it."""
    record = checksum_path(path)
    if not record.is_file():
        raise CheckpointError(path, f"it has no checksum file ({record.name}), so its contents cannot be verified "
                                    "and it was not loaded: rpo_lib writes one with every checkpoint. If it was "
                                    "written before rpo_lib stored checksums and you trust it, give it one with "
                                    "rpo_lib.checkpoints.write_checksum(path).")
    try:
        expected = record.read_text().split()[0].lower()
        actual = file_sha256(path)
    except (OSError, IndexError, UnicodeDecodeError) as error:
        raise CheckpointError(path, f"it or its checksum file cannot be read ({type(error).__name__}: {error})."
                              ) from error
    if actual != expected:
        raise CheckpointError(path, f"truncated or damaged: its bytes do not match the SHA-256 written with it "
                                    f"({actual[:12]}... against {expected[:12]}...), so it changed after it was "
                                    f"written (a bad disk, a partial or failed copy). Its contents cannot be trusted.")


def read(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Verify a checkpoint's checksum, then load it with ``weights_only=True`` (``verify=False``: no checksum, for a
    checkpoint written before checksums); every way the file can be unusable is a ``CheckpointError`` naming it.

    Bytes that match their checksum are the bytes rpo_lib wrote: if loading them fails all the same (out of memory,
    another torch), that error is raised as it is, not taken for damage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file.")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes): the write that made it never finished.")
    if verify:
        _verify(path)
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
    except Exception as error:  # anything the unpickler or the zip reader raises on damaged, unverified bytes
        if verify and not isinstance(error, (EOFError, RuntimeError, ValueError, KeyError, IndexError)):
            raise
        first_line = (str(error).splitlines() or [""])[0][:160]
        raise CheckpointError(
            path, f"not a readable checkpoint ({type(error).__name__}: {first_line}); it is truncated or "
                  f"damaged.") from error
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
    """Delete all but the ``keep`` checkpoints with the highest steps (and their checksums); return what was
    deleted."""
    files = checkpoint_files(directory)
    doomed = [path for _, path in files[:max(0, len(files) - keep)]]
    for path in doomed:
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    for record in _orphan_checksums(directory):
        record.unlink(missing_ok=True)
    return doomed


def _orphan_checksums(directory: str | os.PathLike) -> list[Path]:
    """Checksum files whose checkpoint is gone (a write cut short between the two renames of ``write_atomic``)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return [path for path in root.iterdir() if path.name.endswith(".pt.sha256") and _NAME.match(path.name[:-7])
            and not path.with_name(path.name[:-7]).exists()]


def remove_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Delete every checkpoint file of ``directory``, with its checksum and leftover ``.tmp`` files; other files are
    kept."""
    root = Path(directory)
    doomed = [path for _, path in checkpoint_files(root)]
    doomed += [checksum_path(path) for path in doomed] + _orphan_checksums(root)
    if root.is_dir():
        doomed += [path for path in root.iterdir() if _NAME.match(re.sub(r"(\.sha256)?(\.tmp)?$", "", path.name))
                   and path.name.endswith(".tmp")]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
