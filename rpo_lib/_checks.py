"""Input checks shared by the math modules.

Every check raises ``ValueError`` with a sentence that names the argument, says what is wrong and what to
do, so a bad batch never turns into a silent NaN three calls later.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def check_finite(tensor: Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf); log-probabilities must be finite: check "
            f"the model's logits and that padded positions are masked out before summing."
        )


def check_sequence_logps(**named: Tensor) -> int:
    """Check sequence log-probabilities: each of shape (B,), the same B for all, finite. Returns B."""
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
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty: a loss needs at least one pair.")
        check_finite(tensor, name)
    if shape is None:
        raise ValueError("no log-probability tensors were given.")
    return int(shape[0])


def check_token_inputs(token_logps: Tensor, mask: Tensor, name: str = "token_logps") -> Tensor:
    """Check (B, T) token log-probs and their mask; return the mask as a boolean tensor.

    Positions outside the mask may hold anything (padding); positions inside must be finite, and every
    sequence must keep at least one token, or its normalised loss would be 0/0.
    """
    if token_logps.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(token_logps.shape)}; expected (B, T) per-token log-probs.")
    if mask.shape != token_logps.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {name} has shape {tuple(token_logps.shape)}: "
            f"they must match, one mask entry per token."
        )
    mask = mask.bool() if mask.dtype != torch.bool else mask
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"sequence(s) {empty[:10]} of the batch have an all-zero mask (no completion tokens): drop them "
            f"or check the completion mask; a normalised loss over zero tokens would be NaN."
        )
    check_finite(token_logps[mask], f"{name} (inside the mask)")
    return mask
