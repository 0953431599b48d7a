"""Checks for the notebooks' exercises: a clear verdict, a hint on failure, no crash when unanswered."""

from __future__ import annotations

import math

import torch

__all__ = ["check"]


def _as_float_tensor(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def check(name: str, answer, expected, *, atol: float = 1e-6, rtol: float = 1e-6, hint: str = "") -> bool:
    """Compare an exercise ``answer`` with the ``expected`` value; print the verdict and return it.

    ``answer is None`` means "not attempted yet": prints a reminder and returns False without raising, so
    a notebook runs top to bottom before the reader has tried. Numbers, sequences and tensors are compared
    with ``atol``/``rtol``; anything else with ``==``.
    """
    if answer is None:
        print(f"{name}: not answered yet. Replace `None` with your answer and run the cell again.")
        return False
    try:
        got, want = _as_float_tensor(answer), _as_float_tensor(expected)
        numeric = True
    except (TypeError, ValueError, RuntimeError):
        numeric = False
    if numeric:
        if got.shape != want.shape:
            print(f"{name}: shape {tuple(got.shape)} but the answer has shape {tuple(want.shape)}. {hint}".rstrip())
            return False
        ok = bool(torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=False))
        if not ok:
            if got.numel() == 1 and math.isfinite(float(got)):
                print(f"{name}: not yet: got {float(got):.6g}. {hint}".rstrip())
            else:
                print(f"{name}: not yet: the values differ. {hint}".rstrip())
            return False
    elif answer != expected:
        print(f"{name}: not yet. {hint}".rstrip())
        return False
    print(f"{name}: correct.")
    return True
