"""What makes a checkpoint resumable as *this* run: the random number generators' states, the run's description
(its settings, a fingerprint of its data, the shapes of what it trains), and the list of what differs.

The files themselves (atomic writes, checksums, rotation, ``weights_only`` loading) are ``rpo_lib.checkpoints``';
``Trainer.save_checkpoint`` and ``Trainer.load_checkpoint`` put the two together.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from rpo_lib.log import get_logger
from rpo_lib.train.config import TrainConfig, setting_differences, settings

__all__ = ["differences", "rng_state", "run_description", "set_rng_state"]

log = get_logger(__name__)


def rng_state() -> dict[str, Any]:
    """Every random number generator that a step may draw from, as plain data (weights_only-safe)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` recorded; a different number of GPUs is reported (their draws will differ)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            log.warning(f"the checkpoint has the RNG states of {len(state['cuda'])} GPU(s), this machine has "
                        f"{torch.cuda.device_count()}: CUDA random draws will differ from the original run.")
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def run_description(config: TrainConfig, data_fingerprint: str, model: Any) -> dict[str, Any]:
    """What makes a run this run: its settings, its data and the shapes of what it trains."""
    shapes = {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    return {"config": settings(config), "data": data_fingerprint, "trainable": shapes}


def differences(saved: Mapping[str, Any], mine: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """How a checkpoint's run (``saved``) differs from this one (``mine``, ``config``), one line each; empty: the
    same run. Settings in ``config.RESUME_FREE`` may differ."""
    lines = setting_differences(saved["config"], config)
    if saved["data"] != mine["data"]:
        lines.append(f"the data: the tokenized rows differ (fingerprint {saved['data'][:12]} in the checkpoint, "
                     f"{mine['data'][:12]} now): the same rows, tokenizer and max_length are needed")
    missing = sorted(set(mine["trainable"]) - set(saved["trainable"]))
    unexpected = sorted(set(saved["trainable"]) - set(mine["trainable"]))
    reshaped = sorted(name for name in set(mine["trainable"]) & set(saved["trainable"])
                      if list(mine["trainable"][name]) != list(saved["trainable"][name]))
    if missing or unexpected or reshaped:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} trained tensor(s) this model lacks ({', '.join(unexpected[:3])} ...)")
        if missing:
            parts.append(f"{len(missing)} of this model's trainable tensor(s) are absent "
                         f"({', '.join(missing[:3])} ...)")
        if reshaped:
            name = reshaped[0]
            parts.append(f"{len(reshaped)} tensor(s) of another shape ({name}: {saved['trainable'][name]} in the "
                         f"checkpoint, {mine['trainable'][name]} now)")
        lines.append("the model: " + "; ".join(parts))
    return lines
