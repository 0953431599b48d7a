"""The lab of notebook 07: the task of ``rpo_lib.tasks`` trained with ``rpo_lib.train``, with one set of settings.

``lab_run(method, rows)`` trains a copy of the shipped reference policy with DPO, RPO, HyPO (or SFT, IPO) on the
same data, steps and learning rate, and logs the task's gold reward, KL and decoy mass while it trains. The task
itself (prompts, gold reward, data files) is ``rpo_lib.tasks``; this module only builds and runs on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from rpo_lib.tasks import TopicTask, load_reference
from rpo_lib.train import Trainer, preset

__all__ = ["LAB_SETTINGS", "lab_run"]

LAB_SETTINGS: dict[str, Any] = {
    # Notebook 07's comparison: every method gets the same data, steps, batch, learning rate and beta.
    "learning_rate": 3e-4, "beta": 0.1, "batch_size": 16, "max_steps": 300, "warmup_steps": 10,
    "eval_every": 30,
    "sft_weight": 1.0,  # RPO: a plain weight w = 1 on the token-mean SFT term (RPO_VARIANTS["trl"])
    "lam": 0.1,  # HyPO: the summed log-ratios here are a few nats, lam exceeds the paper's (1e-4 TL;DR, 2e-4 chat)
    "k_online": 2, "online_max_new_tokens": 16,
}


def lab_run(method: str, rows: Sequence[dict[str, Any]], *, model: Any = None, tokenizer: Any = None,
            seed: int = 0, progress: bool = False, **changes: Any):
    """Train a copy of ``pi_ref`` with ``method`` on ``rows`` with the lab's settings; return the trainer.

    ``model``/``tokenizer`` default to the shipped reference (``load_reference``); the model passed is not
    changed (it stays the frozen reference). ``changes`` override ``LAB_SETTINGS`` (e.g. ``max_steps``).
    The evaluator samples 16 responses per prompt every ``eval_every`` steps and scores 64 fixed training
    pairs; read the results from ``trainer.history``.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_reference()
    settings = {**LAB_SETTINGS, **changes}
    config = preset("tiny", method=method, seed=seed, progress=progress, **settings)
    evaluate = TopicTask().evaluator(tokenizer, pairs=list(rows[:64]))
    trainer = Trainer(copy.deepcopy(model), tokenizer, rows, config, ref_model=model, evaluate=evaluate)
    trainer.train()
    return trainer
