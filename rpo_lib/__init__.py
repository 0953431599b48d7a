"""rpo_lib: the library behind the RPO workbook.

Layout (the math knows nothing of transformers; everything else builds on it):

- ``rpo_lib.bt``        Bradley-Terry preferences: probabilities, sampling, maximum-likelihood rewards.
- ``rpo_lib.bandit``    exact bandit worlds (tabular and softmax-linear), DPO/IPO/RLHF/RPO/HyPO on them, and the
                        papers' guarantees as experiments (a package: worlds, policies, training, guarantees, ...).
- ``rpo_lib.coverage``  coverage coefficients: global, KL-ball, linear, and Liu et al.'s partial coverage.
- ``rpo_lib.losses``    DPO, IPO, SFT, RPO, online reverse KL (RLOO), HyPO: pure tensor functions.
- ``rpo_lib.logprobs``  token and sequence log-probabilities from a causal LM's logits (shift, masks).
- ``rpo_lib.packing``   padding-free batches: sequences packed into rows, block-causal attention, scored in input order.
- ``rpo_lib.models``    ``load_policy`` (QLoRA: 4-bit weights, LoRA, an SFT adapter as reference); tiny models.
- ``rpo_lib.families``  tiny random models of 13 decoder families (Llama ... Falcon), what packing does on each.
- ``rpo_lib.memory``    the peak GPU memory of a training step, predicted before loading, and what would make it fit.
- ``rpo_lib.data``      datasets by id or file (schema adapters) -> checked, tokenized examples; drops counted.
- ``rpo_lib.sample``    batched sampling with a KV cache (HyPO's online samples, evaluations).
- ``rpo_lib.train``     one trainer for SFT, DPO, IPO, RPO and HyPO on any Hugging Face causal LM.
- ``rpo_lib.parallel``  a process's part in a multi-process run: its shard, the reductions, DDP or FSDP2.
- ``rpo_lib.launch``    the trainer on many processes, GPUs or machines (accelerate): ``launch.launch(config, ...)``.
- ``rpo_lib.evaluation`` a trained policy against its reference: reward-model win rate, KL to the reference.
- ``rpo_lib.checkpoints`` the trainer's checkpoint files: atomic writes, safe loading, discovery by step.
- ``rpo_lib.tasks``     a language task with a known gold reward ("topic lists") and its shipped files.
- ``rpo_lib.lab``       notebook 07's comparison: the task trained with one set of settings (``lab_run``).
- ``rpo_lib.log``       how the library reports: a logger per module, shown on the screen by default.
- ``rpo_lib.env``       fast mode (``RPO_FAST``), device detection, versions, Colab set-up.
- ``rpo_lib.exercises`` check helpers for the notebooks' exercises.
- ``rpo_lib.plotting``  the workbook's plot style.
- ``rpo_lib.papers``    the two papers' results tables, whole (citations), and what each method did not win.

Submodules are imported on first use, so ``import rpo_lib`` stays fast and does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["bandit", "bt", "chat_task", "checkpoints", "coverage", "data", "env", "evaluation", "exercises", "families",
           "lab", "launch", "log", "logprobs", "losses", "memory", "models", "packing", "papers", "parallel",
           "plotting", "run_log", "sample", "tasks", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f"rpo_lib.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'rpo_lib' has no attribute {name!r}")
