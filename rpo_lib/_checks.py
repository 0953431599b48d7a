"""Input checks shared by the math modules.

Every check raises ``ValueError`` with a sentence that names the argument, says what is wrong and what to
do, so a bad batch never turns into a silent NaN three calls later.

A check on a tensor's *values* (finite, non-empty rows, labels in range) has to read the tensor back to
the host, which on a GPU stalls the pipeline until the kernels before it finish. Called one at a time that
is a few dozen stalls per training step. Inside ``deferred_checks()`` each such check instead records a
boolean tensor on the device and its message; ``DeferredChecks.verify()`` (or ``flags()``, for a caller
that reads them together with other values) reads them all in one transfer and raises the first failure's
error. Nothing is skipped: the same conditions are checked, later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_STACK: list[DeferredChecks] = []


class DeferredChecks:
    """Value checks recorded inside ``deferred_checks()``, read back together."""

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, Callable[[], str]]] = []

    def add(self, ok: Tensor, message: Callable[[], str]) -> None:
        self._pending.append((ok.detach().reshape(()), message))

    def flags(self) -> Tensor | None:
        """The recorded conditions as one float tensor (1 = passed), or None if there are none."""
        if not self._pending:
            return None
        return torch.stack([ok.to(torch.float32) for ok, _ in self._pending])

    def raise_first_failure(self, values: list[float]) -> None:
        """``values``: ``flags()`` read back; raise the first failed check's error, then forget them all."""
        pending, self._pending = self._pending, []
        for (_, message), value in zip(pending, values, strict=True):
            if value != 1.0:
                raise ValueError(message())

    def verify(self) -> None:
        """Read every recorded condition (one transfer) and raise the first failure's ``ValueError``."""
        flags = self.flags()
        if flags is not None:
            self.raise_first_failure(flags.tolist())


@contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Record value checks instead of reading each back at once; call ``verify()`` before trusting results."""
    checks = DeferredChecks()
    _STACK.append(checks)
    try:
        yield checks
    finally:
        _STACK.remove(checks)


def require(ok: Tensor, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` unless the boolean tensor ``ok`` is True (deferred if asked to)."""
    if _STACK:
        _STACK[-1].add(ok, message)
    elif not bool(ok):
        raise ValueError(message())


def as_tensor(value, name: str) -> Tensor:
    """Return ``value`` as a tensor (lists and numpy arrays are converted; tensors are kept as they are)."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or array of numbers; got {type(value).__name__}.") from error


def to_float32(tensor: Tensor) -> Tensor:
    """Upcast half-precision inputs: the losses always compute in float32 (float64 is kept)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def check_hyperparameter(value, name: str, *, positive: bool = False, hint: str = "") -> float:
    """A finite real number, > 0 if ``positive`` else >= 0; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, Tensor) and value.numel() == 1):
        raise ValueError(f"{name} must be a number; got {type(value).__name__}.")
    number = float(value)
    if not math.isfinite(number) or (number <= 0 if positive else number < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}{hint}; got {number}.")
    return number


def check_not_empty(tensor: Tensor, name: str) -> None:
    if tensor.numel() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty: a loss needs at least one pair (or prompt); skip empty batches.")


def _non_finite_message(tensor: Tensor, name: str) -> Callable[[], str]:
    def message() -> str:
        bad = int((~torch.isfinite(tensor)).sum())
        return (f"{name} holds {bad} non-finite value(s) (NaN or inf); log-probabilities must be finite: check "
                f"the model's logits and that padded positions are masked out before summing.")
    return message


def check_finite(tensor: Tensor, name: str) -> None:
    require(torch.isfinite(tensor).all(), _non_finite_message(tensor, name))


def check_sequence_logps(**named: Tensor) -> int:
    """Check sequence log-probabilities: each of shape (B,), the same B for all, non-empty, finite. Returns B.

    The finiteness of all of them is one condition (one read-back, or one deferred flag).
    """
    shape = None
    first = None
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B,); got {type(tensor).__name__}.")
        if tensor.dim() != 1:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but sequence log-probabilities have shape (B,): "
                f"reduce token log-probs over the sequence first (rpo_lib.logprobs.sequence_logprobs)."
            )
        if shape is None:
            shape, first = tensor.shape, name
        elif tensor.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first} has shape {tuple(shape)}: every "
                f"log-probability tensor must hold one value per pair of the same batch."
            )
        check_not_empty(tensor, name)
    if shape is None:
        raise ValueError("no log-probability tensors were given.")

    def message() -> str:
        for name, tensor in named.items():
            if not bool(torch.isfinite(tensor).all()):
                return _non_finite_message(tensor, name)()
        return "a log-probability tensor held a non-finite value."  # pragma: no cover (checked above)
    require(torch.stack([torch.isfinite(t).all() for t in named.values()]).all(), message)
    return int(shape[0])


def check_token_inputs(token_logps: Tensor, mask: Tensor, name: str = "token_logps") -> Tensor:
    """Check (B, T) token log-probs and their mask; return the mask as a boolean tensor.

    Positions outside the mask may hold anything (padding); positions inside must be finite, there must be at
    least one sequence, and every sequence must keep at least one token, or its normalised loss would be 0/0.
    """
    if token_logps.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(token_logps.shape)}; expected (B, T) per-token log-probs.")
    if mask.shape != token_logps.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(token_logps.shape)}: "
            f"they must match, one mask entry per token."
        )
    if token_logps.shape[0] == 0:
        raise ValueError(f"{name} is empty (no sequences): a loss needs at least one; skip empty batches.")
    mask = mask.bool() if mask.dtype != torch.bool else mask

    def empty_rows() -> str:
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        return (f"sequence(s) {empty[:10]} of the batch have an all-zero mask (no completion tokens): drop them "
                f"or check the completion mask; a normalised loss over zero tokens would be NaN.")
    require(mask.any(dim=1).all(), empty_rows)
    inside = torch.where(mask, token_logps, torch.zeros((), dtype=token_logps.dtype, device=token_logps.device))
    require(torch.isfinite(inside).all(), lambda: _non_finite_message(token_logps[mask], f"{name} (inside the mask)")())
    return mask
