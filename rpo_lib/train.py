"""One trainer for SFT, DPO, IPO, RPO and HyPO on any Hugging Face causal LM (full fine-tuning or LoRA).

::

    from rpo_lib.train import Trainer, preset
    config = preset("tiny", method="rpo", sft_weight=1.0, max_steps=300)
    trainer = Trainer(model, tokenizer, rows, config)        # rows: {"prompt", "chosen", "rejected"}, or chats
    history = trainer.train()                                # resume later with trainer.train(resume=True)
    steps, margins = history.series("rewards/margins")

The losses are ``rpo_lib.losses``' pure functions; this module feeds them: it tokenizes and checks the rows
(``rpo_lib.data``; dropped rows are reported), computes log-probabilities (``rpo_lib.logprobs``), gets the
reference's log-probabilities, draws HyPO's online samples (``rpo_lib.sample``), accumulates gradients over
micro-batches, steps AdamW with warm-up and a schedule, logs, evaluates and checkpoints
(``rpo_lib.checkpoints``).

Log-probabilities. ``log pi(y|x)`` is the sum over the completion's tokens for DPO, RPO and HyPO (the exact
log-probability, as the papers and TRL use it) and the mean for IPO (the IPO authors' form and TRL's
``loss_type="ipo"``); ``logp_reduction`` overrides it for the offline pairs. HyPO's online KL always uses
sums: it estimates ``KL(pi || pi_ref)`` of whole responses.

Dropout is turned off in the policy and the reference (``disable_dropout=True``, ``rpo_lib.models``), as TRL
does, so that a policy equal to ``pi_ref`` gives zero margins and a zero online KL.

The reference policy ``pi_ref`` is, in this order: the ``ref_model`` you pass; for a PEFT model, the same
model with its adapter disabled (no second copy in memory); otherwise a frozen copy of the model as it is
when the trainer is made. ``precompute_ref_logps=True`` scores the pairs once under ``pi_ref`` before
training (``precompute_ref_batch_size`` pairs per pass); for full fine-tuning without HyPO or an evaluator
this also avoids the copy.

Batches. Every epoch is a fresh seeded permutation of the pairs, cut into ``batch_size`` pieces; the last
piece of an epoch is smaller when ``batch_size`` does not divide the data (as a PyTorch ``DataLoader`` with
``drop_last=False``), so no batch holds a pair twice.

Gradient accumulation is exact: a micro-batch's loss is weighted by its share of the batch's pairs, and the
token-mean SFT normalisation divides by the whole batch's token count, so one step on ``batch_size`` pairs
gives the same update whatever ``micro_batch_size`` is (tests/test_train.py checks it). HyPO draws the whole
step's online samples first, in as few generation loops as the KV cache's memory allows
(``online_sample_rows``), before any activation is alive; each micro-batch then backpropagates its offline
loss before it scores its online samples, so the two never hold activations at the same time.

Many processes (``rpo_lib.launch``): the same loop runs in every process; a ``parallel`` object
(``rpo_lib.parallel``) gives each process a disjoint shard of every global batch, weights its losses by their
share of the global batch, sums the metrics over processes and wraps the model (DDP or FSDP2), so that N
processes compute the gradient that one process computes on the same global batch. HyPO's online samples are
seeded per row from (seed, step, example, sample number), so they are the same whichever process draws them.

The device is read back once per step: metrics stay tensors on the device, the input checks of the losses
are recorded and verified together with them (``rpo_lib._checks.deferred_checks``), and a non-finite loss or
gradient norm stops the run before the optimizer steps.

Checkpoints (``checkpoint_dir``) are written atomically with a SHA-256 checksum beside them and loaded with
``weights_only=True`` after the checksum is verified (``rpo_lib.checkpoints``). A checkpoint holds the trainable
weights, optimizer, schedule, RNG states (CPU, CUDA, MPS, Python, NumPy), history and a description of the run:
the settings, a fingerprint of the tokenized data and the trainable parameters' shapes. Resuming checks all three,
lists every difference, and loads nothing unless they agree; it then reproduces the uninterrupted run exactly. An
unreadable or damaged newest checkpoint is reported and the newest intact one is used. A new run refuses a directory
that holds checkpoints unless told to resume or to overwrite them. With many processes the first one writes
the whole (gathered) state, so a run can resume with another number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from rpo_lib import checkpoints, losses, packing, papers
from rpo_lib._checks import DeferredChecks, deferred_checks
from rpo_lib.checkpoints import latest_checkpoint
from rpo_lib.data import (SFTExample, collate_preferences, collate_sft, fingerprint, tokenize_preferences,
                          tokenize_sft)
from rpo_lib.env import device as pick_device
from rpo_lib.logprobs import completion_logprobs, reduce_token_logprobs
from rpo_lib.models import (REF_ADAPTER, as_reference, base_model, compute_dtype, disable_dropout,
                            enable_checkpointing, find_dropout, frozen_copy, is_peft, keep_4bit_trainable_on_cpu)
from rpo_lib.packing import PackedBatch, pack_sequences, packed_token_logprobs
from rpo_lib.parallel import SingleProcess, micro_batches, shard
from rpo_lib.run_log import REPORT_TARGETS, RunLog
from rpo_lib.sample import Samples, row_seed, rows_that_fit, sample

__all__ = ["METHODS", "PRESETS", "History", "Method", "TrainConfig", "Trainer", "latest_checkpoint", "preset"]

Method = Literal["sft", "dpo", "ipo", "rpo", "hypo"]
METHODS = ("sft", "dpo", "ipo", "rpo", "hypo")
Schedule = Literal["constant", "linear", "cosine"]
Reduction = Literal["sum", "mean"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model, the tokenizer and the data. Defaults suit a tiny CPU model.

    Use ``preset(name, **changes)`` for the named starting points in ``PRESETS``. Every field is checked when
    the config is made (type, range, and how fields fit together); an error lists every problem.
    """

    # --- what to optimise (docs/math.md sections 3, 6, 7) -------------------------------------------------
    method: Method = "dpo"
    beta: float = 0.1  # KL strength of DPO/RPO/HyPO; IPO's tau (TRL's convention)
    rpo_variant: str = "trl"  # RPO's SFT normalisation: a key of rpo_lib.losses.RPO_VARIANTS
    eta: float | None = None  # RPO: Liu et al.'s eta, SFT term x eta * beta (give this or sft_weight)
    sft_weight: float | None = None  # RPO: a plain weight w on the SFT term; neither: the variant's published one
    sft_normalization: losses.Normalization = "token_mean"  # method="sft": how the NLL is averaged
    lam: float = 0.05  # HyPO: weight of the online reverse KL
    k_online: int = 2  # HyPO: samples per prompt (RLOO needs >= 2)
    online_max_new_tokens: int = 32  # HyPO: longest online sample
    online_temperature: float = 1.0  # sampling temperature; HyPO needs 1 (samples of the policy itself)
    logp_reduction: Reduction | None = None  # log pi(y|x) of the pairs: None = the method's own (see module doc)
    # --- optimisation ----------------------------------------------------------------------------------
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10  # linear warm-up from 0
    lr_schedule: Schedule = "cosine"  # after warm-up: constant, linear to 0, or cosine to 0
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    batch_size: int = 16  # pairs (or SFT rows) per optimizer step
    micro_batch_size: int | None = None  # pairs per forward/backward; None = batch_size (no accumulation)
    max_steps: int = 200  # optimizer steps; the data are reshuffled every epoch
    max_length: int = 64  # longest prompt + completion in tokens (longer completions are cut, counted)
    max_prompt_length: int | None = None  # longer prompts keep their end (or are dropped), counted
    prompt_truncation: Literal["keep_end", "drop"] = "keep_end"  # what happens to a prompt over max_prompt_length
    parse_special_tokens: bool = True  # False: a special token's text in the data (a typed "<|im_end|>") stays text
    max_cut_share: float = 0.05  # more completions than this share cut to max_length (each losing its end of
    #                              turn): a warning, or an error with strict=True
    strict: bool = False  # refuse, instead of warning about, data the config fits badly (max_cut_share)
    gradient_checkpointing: bool = False  # trade compute for activation memory (large models)
    padding_free: bool = False  # pack sequences into rows (rpo_lib.packing): no compute on padding
    packing_attention: Literal["mask", "varlen"] = "mask"  # packed rows: block-causal mask, or varlen attention
    group_by_length: bool = False  # batches of similar lengths (less padding); the batch order stays random
    disable_dropout: bool = True  # turn every dropout off (policy and reference), as TRL does
    seed: int = 0  # data order, online samples and every other random draw
    # --- memory ----------------------------------------------------------------------------------------
    precompute_ref_logps: bool = False  # score the pairs under pi_ref once, before training
    precompute_ref_batch_size: int | None = None  # pairs per no-grad pass of that; None: 4 x micro-batch
    online_sample_rows: int | None = None  # HyPO: most sequences per generation loop; None: fit the KV cache
    #                                        into half the GPU memory left after loading (one loop on a CPU)
    # --- bookkeeping -------------------------------------------------------------------------------------
    eval_every: int = 0  # run the evaluator every this many steps (and before and after); 0: before/after only
    checkpoint_dir: str | None = None  # where checkpoints go; None: no checkpoints
    save_every: int = 0  # checkpoint every this many steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    progress: bool = True  # a tqdm progress bar with the live loss
    report_to: tuple[str, ...] = ()  # "tensorboard" and/or "jsonl": the history as it grows (rpo_lib.run_log)
    log_dir: str | None = None  # where report_to writes; None: <checkpoint_dir>/logs, else runs/<method>-<time>
    device: str | None = None  # None: CUDA, then MPS, then CPU

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems) + ".")

    @property
    def reduction(self) -> Reduction:
        """How the offline pairs' token log-probs are reduced: ``logp_reduction``, or the method's own."""
        if self.logp_reduction is not None:
            return self.logp_reduction
        return "mean" if self.method == "ipo" else "sum"

    def rpo_kwargs(self) -> dict:
        """``rpo_loss``'s normalisation and coefficient: ``eta`` or ``sft_weight`` as set, else the variant's."""
        variant = losses.RPO_VARIANTS[self.rpo_variant]
        if self.eta is not None:
            return {"normalization": variant.normalization, "eta": self.eta}
        if self.sft_weight is not None:
            return {"normalization": variant.normalization, "sft_weight": self.sft_weight}
        return variant.kwargs()


# What each field may hold: (kind, bound). Kinds: "real" (finite number), "int", "bool", "choice", "text",
# "betas"; a trailing "?" allows None. tests/test_train.py checks that every field has a rule.
_FIELD_RULES: dict[str, tuple[str, Any]] = {
    "method": ("choice", METHODS), "beta": ("real", "> 0"), "eta": ("real?", ">= 0"),
    "sft_weight": ("real?", ">= 0"),
    "rpo_variant": ("choice", tuple(losses.RPO_VARIANTS)),
    "sft_normalization": ("choice", ("sum", "seq_mean", "token_mean")), "lam": ("real", ">= 0"),
    "k_online": ("int", ">= 1"), "online_max_new_tokens": ("int", ">= 1"), "online_temperature": ("real", "> 0"),
    "logp_reduction": ("choice?", ("sum", "mean")), "learning_rate": ("real", "> 0"),
    "weight_decay": ("real", ">= 0"), "adam_betas": ("betas", None), "warmup_steps": ("int", ">= 0"),
    "lr_schedule": ("choice", ("constant", "linear", "cosine")), "max_grad_norm": ("real?", "> 0"),
    "batch_size": ("int", ">= 1"), "micro_batch_size": ("int?", ">= 1"), "max_steps": ("int", ">= 1"),
    "max_length": ("int", ">= 2"), "max_prompt_length": ("int?", ">= 1"), "gradient_checkpointing": ("bool", None),
    "prompt_truncation": ("choice", ("keep_end", "drop")), "padding_free": ("bool", None),
    "parse_special_tokens": ("bool", None), "max_cut_share": ("real", ">= 0"), "strict": ("bool", None),
    "report_to": ("targets", REPORT_TARGETS), "log_dir": ("text?", None),
    "packing_attention": ("choice", ("mask", "varlen")),
    "group_by_length": ("bool", None),
    "disable_dropout": ("bool", None), "seed": ("int", ">= 0"), "precompute_ref_logps": ("bool", None),
    "precompute_ref_batch_size": ("int?", ">= 1"), "online_sample_rows": ("int?", ">= 1"),
    "eval_every": ("int", ">= 0"), "checkpoint_dir": ("text?", None), "save_every": ("int", ">= 0"),
    "keep_checkpoints": ("int", ">= 1"), "progress": ("bool", None), "device": ("text?", None),
}


def _field_problem(name: str, value: Any, kind: str, bound: Any) -> str | None:
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind == "bool":
        return None if isinstance(value, bool) else f"{name} must be True or False; got {value!r}"
    if kind == "choice":
        return None if value in bound else f"{name} must be one of {list(bound)}; got {value!r}"
    if kind == "text":
        return None if isinstance(value, (str, os.PathLike)) else f"{name} must be text; got {value!r}"
    if kind == "targets":
        ok = isinstance(value, (tuple, list)) and all(isinstance(v, str) and v in bound for v in value)
        return None if ok else f"{name} must be a tuple of {list(bound)}; got {value!r}"
    if kind == "betas":
        ok = (isinstance(value, (tuple, list)) and len(value) == 2
              and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= float(b) < 1 for b in value))
        return None if ok else f"{name} must be two numbers in [0, 1), e.g. (0.9, 0.999); got {value!r}"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return f"{name} must be a whole number; got {value!r} ({type(value).__name__})"
    if kind == "real" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                           or not math.isfinite(value)):
        return f"{name} must be a finite number; got {value!r}"
    limit = int(bound.split()[1])
    if (bound.startswith(">=") and value < limit) or (bound.startswith("> ") and value <= limit):
        return f"{name} must be {bound}; got {value!r}"
    return None


def _problems(config: TrainConfig) -> list[str]:
    """Every problem of ``config``, each a clause that says what to fix."""
    problems = []
    for item in dataclasses.fields(config):
        kind, bound = _FIELD_RULES[item.name]
        problem = _field_problem(item.name, getattr(config, item.name), kind, bound)
        if problem:
            problems.append(problem)
    if problems:  # the relations below assume well-typed fields
        return problems
    if config.micro_batch_size is not None and config.micro_batch_size > config.batch_size:
        problems.append(f"micro_batch_size must lie in [1, batch_size={config.batch_size}]; "
                        f"got {config.micro_batch_size}")
    if config.max_prompt_length is not None and config.max_prompt_length >= config.max_length:
        problems.append(f"max_prompt_length must be below max_length={config.max_length} (a completion needs "
                        f"room); got {config.max_prompt_length}")
    if config.max_cut_share > 1:
        problems.append(f"max_cut_share is a share of completions, in [0, 1]; got {config.max_cut_share}")
    if config.eta is not None and config.sft_weight is not None:
        problems.append(f"give RPO's coefficient once: eta={config.eta} (Liu et al.'s, times beta) or "
                        f"sft_weight={config.sft_weight} (a plain weight), not both")
    if config.method == "hypo":
        if config.k_online < 2:
            problems.append(f"HyPO's RLOO estimate needs k_online >= 2; got {config.k_online}")
        if config.online_temperature != 1:
            problems.append(f"HyPO's online KL needs samples of the policy itself (online_temperature=1); with "
                            f"{config.online_temperature} the estimate of KL(pi || pi_ref) is biased")
    return problems


PRESETS: dict[str, TrainConfig] = {
    # A ~0.1M-parameter model on a 2-core CPU (notebook 07): a few seconds per 100 steps. Its max_length of 48 suits
    # the task's short lists, not chat data: real chat rows are cut (the trainer warns), use "cpu_chat" for those.
    "tiny": TrainConfig(learning_rate=1e-3, batch_size=16, max_length=48, warmup_steps=10, max_steps=300,
                        lam=0.05, online_max_new_tokens=16),
    # A small real chat model (SmolLM2-135M-Instruct, rpo_lib.models.smollm2) with a LoRA adapter on a laptop CPU
    # (notebook 08's CPU mode; the launcher's default). max_length 512 / prompts 256 hold typical chat turns whole
    # (a cut completion loses its end of turn: the trainer warns above max_cut_share); padding-free batches spend no
    # time on padding, which on a CPU is time. benchmarks/real_model_cpu.json: about 5 s per step of 4 chat pairs
    # on 2 cores.
    "cpu_chat": TrainConfig(method="rpo", beta=0.1, learning_rate=2e-4, batch_size=8, micro_batch_size=4,
                            max_length=512, max_prompt_length=256, warmup_steps=5, lr_schedule="cosine",
                            max_steps=100, padding_free=True, lam=2e-4, k_online=2, online_max_new_tokens=96),
    # A 7B model in 4-bit with a LoRA adapter on one 24-80 GB GPU. beta and eta are Liu et al.'s published beta-series
    # values (zephyr-7b-beta recipe) with the alignment-handbook normalisation (RPO_VARIANTS["handbook"]); the learning
    # rate is a usual LoRA DPO value. 64 pairs per step = 32 micro-batches of 2; max_steps is one UltraFeedback epoch
    # (papers.ULTRAFEEDBACK_TRAIN_PAIRS / 64). The reference pass without gradients takes 16 pairs at a time. HyPO's lam
    # is Song et al.'s general-chat value (UltraFeedback, appendix D.2.2: 2e-4; 1e-4 is their TL;DR value); they also
    # add a length penalty of 0.02 per token to the online term, which rpo_lib's HyPO does not implement.
    # tests/test_guarantees.py checks these values against rpo_lib.papers.SETTINGS.
    "qlora_7b": TrainConfig(method="rpo", beta=0.01, eta=0.005, rpo_variant="handbook", learning_rate=5e-5,
                            batch_size=64, micro_batch_size=2, max_length=1024, max_prompt_length=512,
                            warmup_steps=50, lr_schedule="cosine", gradient_checkpointing=True,
                            max_steps=math.ceil(papers.ULTRAFEEDBACK_TRAIN_PAIRS / 64),
                            lam=2e-4, online_max_new_tokens=256, precompute_ref_logps=False,
                            precompute_ref_batch_size=16, save_every=100),
}

# Settings that may differ on resume: they change how a step is computed or recorded, not what it computes
# (accumulation is exact, evaluations and checkpoints do not touch training). max_steps may grow: the
# schedule is then computed for the new length (a note says so).
RESUME_FREE = frozenset({"micro_batch_size", "gradient_checkpointing", "padding_free", "packing_attention",
                         "precompute_ref_batch_size",
                         "online_sample_rows", "eval_every", "checkpoint_dir", "save_every", "keep_checkpoints",
                         "progress", "device", "max_steps", "max_cut_share", "strict", "report_to", "log_dir"})
# padding_free: how many examples the trainer scores both ways before training (2: four sequences packed, so some share
# a row; padded one pair at a time, the shortest: a small pass), and the largest difference per
# completion token (nats) it accepts, by compute dtype. Measured on CPU in float32: at most 2e-6 on every family
# that is exact (tests/test_families.py); a leak across sequences or a dropped window costs 1e-2 to 1 and more.
# In 16-bit dtypes the two paths round differently; their agreement on a GPU is what benchmarks/gpu_check.sh
# measures, and the bound below only catches gross errors there (OPT's and Falcon's are refused by rule).
PACKING_CHECK_EXAMPLES = 2
PACKING_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
_GPU_MEMORY_FOR_SAMPLING = 0.5  # share of the GPU memory left after loading that HyPO's KV cache may take


def preset(name: str, **changes: Any) -> TrainConfig:
    """``PRESETS[name]`` with ``changes`` applied: ``preset("tiny", method="hypo", lam=0.1)``."""
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r}; the presets are {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **changes)


class History(list):
    """The training log: one dict per optimizer step (``step`` >= 1), evaluations merged into their step's row
    (the evaluation before training is the row with ``step`` 0)."""

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of every row that has ``key``."""
        rows = [row for row in self if key in row]
        if not rows:
            raise KeyError(f"no row of the history has {key!r}; keys: {sorted(self.keys())}")
        return np.array([row["step"] for row in rows]), np.array([row[key] for row in rows], dtype=float)

    def last(self, key: str) -> float:
        """The latest value of ``key``."""
        return float(self.series(key)[1][-1])

    def keys(self) -> set[str]:
        return {key for row in self for key in row}


def _model_name(model: Any) -> str:
    return type(base_model(model)).__name__


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): warm-up, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _read_back(values: Mapping[str, Tensor], checks: DeferredChecks | None = None) -> dict[str, float]:
    """Device scalars -> floats in one transfer; the deferred checks' failures are raised first."""
    names = list(values)
    device = next(iter(values.values())).device
    flags = checks.flags() if checks is not None else None
    parts = [value.detach().to(device=device, dtype=torch.float32).reshape(1) for value in values.values()]
    numbers_read = torch.cat(parts + ([flags.to(device)] if flags is not None else [])).tolist()
    if checks is not None and flags is not None:
        checks.raise_first_failure(numbers_read[len(names):])
    return dict(zip(names, numbers_read[:len(names)], strict=True))


def _checkpointing_on(model: Any) -> bool:
    """Whether activation checkpointing is already on (``load_policy`` turns it on)."""
    base = base_model(model)
    name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


def _length(example: Any) -> int:
    """Tokens of an example's longest row (prompt + its longest completion)."""
    if isinstance(example, SFTExample):
        return len(example.prompt_ids) + len(example.completion_ids)
    return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))


def _group_by_length(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator,
                     batches_per_group: int = 50) -> list[int]:
    """A random order in which each batch holds examples of similar length (less padding, fuller packed rows).

    The shuffled order is cut into groups of ``batches_per_group`` batches; each group is sorted by length and
    cut into batches; the batches are then shuffled (the group's longest first, so an out-of-memory shows at
    once), so that no length is trained in a run of steps. transformers' ``LengthGroupedSampler`` does the same.
    """
    group = batch_size * batches_per_group
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start:start + group], key=lambda i: -lengths[i])
        batches.extend(chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size))
    full = [b for b in batches if len(b) == batch_size]
    partial = [b for b in batches if len(b) < batch_size]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if shuffled:
        longest = max(range(len(shuffled)), key=lambda i: lengths[shuffled[i][0]])
        shuffled.insert(0, shuffled.pop(longest))
    return [i for b in shuffled + partial for i in b]


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            print(f"rpo_lib.train: the checkpoint has the RNG states of {len(state['cuda'])} GPU(s), this machine "
                  f"has {torch.cuda.device_count()}: CUDA random draws will differ from the original run.")
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


class Trainer:
    """Trains ``model`` with ``config.method`` on ``rows``; see the module docstring.

    Args:
        model: a Hugging Face causal LM, or a PEFT model wrapping one (only trainable parameters are updated).
        tokenizer: its tokenizer (needs an EOS token; the pad token falls back to EOS).
        rows: SFT rows (``{"prompt", "completion"}`` or ``{"messages"}``) for ``method="sft"``, else preference
            rows (``{"prompt", "chosen", "rejected"}``, or chats: see ``rpo_lib.data``); a list of dicts or a
            ``datasets.Dataset``.
        config: a ``TrainConfig`` (``preset("tiny")`` etc.).
        ref_model: the reference policy, if not the model itself as it is now (see the module docstring).
        ref_adapter_name: for a PEFT model, the frozen adapter that is ``pi_ref`` (an SFT adapter). Default: the
            adapter named ``"reference"`` if the model has one (``rpo_lib.models.load_policy(sft_adapter=...)``
            adds it), else the base model with the adapter disabled.
        evaluate: ``evaluate(trainer) -> {name: float}``, run before training, every ``eval_every`` steps and
            at the end; its metrics go into the history (``rpo_lib.tasks.TopicTask.evaluator`` is one). With
            many processes every process runs it (a sharded model's passes need them all).
        parallel: this process's part in a multi-process run (``rpo_lib.parallel.Distributed``, made by
            ``rpo_lib.launch``); default: one process.
    """

    def __init__(self, model: Any, tokenizer: Any, rows: Iterable[Mapping[str, Any]], config: TrainConfig, *,
                 ref_model: Any = None, evaluate: Callable[[Trainer], dict[str, float]] | None = None,
                 ref_adapter_name: str | None = None, parallel: SingleProcess | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig (e.g. preset('tiny')); got {type(config).__name__}.")
        self.config = config
        self.tokenizer = tokenizer
        self.evaluate = evaluate
        self.parallel = parallel or SingleProcess()
        self.device = self.parallel.device or pick_device(config.device)
        self.model = self._place(model)
        if config.disable_dropout:
            disable_dropout(self.model)
            if ref_model is not None:
                disable_dropout(ref_model)
        elif config.method == "hypo" and find_dropout(self.model):
            raise ValueError(f"HyPO scores its own samples in train mode, so with dropout on "
                             f"({', '.join(find_dropout(self.model)[:3])} ...) its KL estimate is biased: keep "
                             f"disable_dropout=True.")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokenize = tokenize_sft if config.method == "sft" else tokenize_preferences
        self.examples: list[Any]
        self.examples, self.report = tokenize(rows, tokenizer, max_length=config.max_length,
                                              max_prompt_length=config.max_prompt_length,
                                              prompt_truncation=config.prompt_truncation,
                                              parse_special_tokens=config.parse_special_tokens)
        report = self.report
        if (report.n_dropped or report.truncated or report.special_text) and self.parallel.is_main:
            print(f"rpo_lib.train: {report}")  # nothing is dropped silently (rpo_lib.data)
        if report.cut_share > config.max_cut_share:
            message = (f"{report.completions_cut} of {report.completions} completions ({report.cut_share:.0%}) are cut "
                       f"to max_length={config.max_length} and lose their end-of-turn token, above max_cut_share="
                       f"{config.max_cut_share:g}: the model would learn replies that never end. Raise max_length "
                       f"(preset('cpu_chat') holds typical chat turns), or filter long rows out.")
            if config.strict:
                raise ValueError(f"strict=True: {message}")
            warnings.warn(f"rpo_lib.train: {message}", UserWarning, stacklevel=2)
        self.data_fingerprint = fingerprint(self.examples)
        self.history = History()
        self.seconds = 0.0
        self.step = 0
        self._ref_logps: Tensor | None = None
        self.ref_adapter_name = self._ref_adapter(ref_adapter_name)
        self.ref_model = self._reference(ref_model)
        if config.gradient_checkpointing and not _checkpointing_on(self.model):
            enable_checkpointing(self.model)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere): unfreeze "
                             "them, or add a LoRA adapter (rpo_lib.models.with_lora).")
        # The module gradient passes go through (a DDP wrapper, or the model sharded in place by FSDP2) and the
        # optimizer over its trainable parameters (FSDP2 replaces them by sharded ones).
        self.train_model, self.optimizer = self.parallel.prepare(self.model, lambda params: torch.optim.AdamW(
            params, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay))
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, self.config))
        self.online_sample_rows = self._online_rows() if config.method == "hypo" else None
        self._permutation: tuple[int, list[int]] | None = None
        # A 4-bit or bf16 base with float32 adapters computes under autocast, as TRL with bf16=True does: without
        # it peft casts each adapted layer's input to float32 and keeps that copy (rpo_lib.memory).
        self.compute_dtype = compute_dtype(self.model)
        self._autocast = self.compute_dtype in (torch.bfloat16, torch.float16) and any(
            p.dtype == torch.float32 for p in self.parameters)
        if config.padding_free:
            self._check_packing(user_ref_model=ref_model is not None)

    # ------------------------------------------------------------------------------------------- set-up
    def _place(self, model: Any) -> Any:
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if not quantized and getattr(model, "hf_device_map", None) is None:
            model = model.to(self.device)
        else:
            self.device = next(model.parameters()).device
        if quantized and self.device.type == "cpu":
            keep_4bit_trainable_on_cpu(model)  # bitsandbytes' CPU inference packing has no backward
        return model

    def _ref_adapter(self, name: str | None) -> str | None:
        adapters = set(getattr(self.model, "peft_config", None) or {})
        if name is None:
            return REF_ADAPTER if REF_ADAPTER in adapters and is_peft(self.model) else None
        if name not in adapters:
            raise ValueError(f"ref_adapter_name={name!r}, but the model's adapters are {sorted(adapters) or 'none'}: "
                             f"load the SFT adapter under that name (rpo_lib.models.load_policy(sft_adapter=...)).")
        return name

    def _reference(self, ref_model: Any) -> Any:
        config = self.config
        if ref_model is not None:  # used under torch.no_grad; its requires_grad flags are left as they are
            return self._place(ref_model).eval()
        if is_peft(self.model):
            return None  # the model with its adapter disabled
        needs_model = config.method == "hypo" or self.evaluate is not None or (
            config.method != "sft" and not config.precompute_ref_logps)
        if not needs_model:
            return None
        return frozen_copy(self.model)

    def _online_rows(self) -> int | None:
        """Sequences per HyPO generation loop: the config's, else what half the free GPU memory holds.

        Computed once, when the trainer is made (from the memory left after loading), so that the same
        set-up always cuts the samples the same way; a checkpoint records it for the resumed run."""
        config = self.config
        if config.online_sample_rows is not None:
            return config.online_sample_rows
        if self.device.type != "cuda":
            return None
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        free = torch.cuda.get_device_properties(index).total_memory - torch.cuda.memory_reserved(index)
        tokens = config.max_length + config.online_max_new_tokens
        # Every process cuts its samples the same way (FSDP's passes are collective): the smallest GPU's figure.
        return self.parallel.minimum(rows_that_fit(self.model, tokens, _GPU_MEMORY_FOR_SAMPLING * free))

    def _forward(self, model: Any, batch: Mapping[str, Tensor] | PackedBatch, reduction: Reduction | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """(sequence log-probs, token log-probs, mask) of right-padded rows or of a ``PackedBatch``."""
        reduction = reduction or self.config.reduction
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self._autocast):
            if isinstance(batch, PackedBatch):
                token_logps, mask = packed_token_logprobs(model, batch, attention=self.config.packing_attention)
                return reduce_token_logprobs(token_logps, mask, reduction=reduction), token_logps, mask
            return completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                       reduction=reduction)

    def collate(self, examples: Sequence[Any], *, padded: bool = False) -> dict[str, Tensor] | PackedBatch:
        """One micro-batch: right-padded rows, or packed rows with ``padding_free`` (chosen rows first, then the
        rejected rows, for preference examples); ``padded=True``: right-padded whatever the config says. Packed rows
        are ``max_length`` long (or the longest sequence)."""
        pack = self.config.padding_free and not padded
        if isinstance(examples[0], SFTExample):
            if not pack:
                return collate_sft(examples, self.pad_token_id)
            prompts, completions = [e.prompt_ids for e in examples], [e.completion_ids for e in examples]
        else:
            if not pack:
                return collate_preferences(examples, self.pad_token_id)
            prompts = [e.prompt_ids for e in examples] * 2
            completions = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
        row = max(self.config.max_length, max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)))
        return pack_sequences(prompts, completions, max_row_tokens=row, pad_token_id=self.pad_token_id)

    def _check_packing(self, *, user_ref_model: bool) -> None:
        """``padding_free``: refuse, before any step, a model whose packed rows are not scored as padded rows are.

        First what is known in advance (``rpo_lib.packing.unsupported``: families whose mask ignores the positions,
        ALiBi, layer kinds it cannot mask, sliding windows read from the config), then a measurement: the
        ``PACKING_CHECK_EXAMPLES`` shortest examples scored without gradients, each alone in a padded pass and all
        together in packed rows (so several sequences share a row). No pass holds more logits than a padded
        training step of the shortest pair would. The largest difference of a sequence's log-prob, per completion
        token, must stay within ``PACKING_TOLERANCE`` of the compute dtype: a family that leaks attention across
        packed sequences or transforms its logits in a way packing misses differs by far more
        (tests/test_families.py). Windows longer than these short examples do not show here: the rules cover
        them. Every process runs the same passes and takes the largest difference of all."""
        config = self.config
        models = [("the model", self.model)] + ([("ref_model", self.ref_model)] if user_ref_model else [])
        for what, model in models:
            problem = packing.unsupported(model, config.packing_attention)
            if problem is not None:
                raise ValueError(f"padding_free=True: {what} ({_model_name(model)}) cannot be scored exactly in "
                                 f"packed rows with packing_attention={config.packing_attention!r}: {problem}. Use "
                                 f"padding_free=False (padded batches are exact on every model).")
        shortest = sorted(range(len(self.examples)), key=lambda i: (_length(self.examples[i]), i))
        examples = [self.examples[i] for i in shortest[:PACKING_CHECK_EXAMPLES]]
        tolerance = PACKING_TOLERANCE.get(self.compute_dtype, PACKING_TOLERANCE[torch.float32])
        other = "varlen" if config.packing_attention == "mask" else "mask"
        for what, model in models:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    alone = [self._forward(model, self._to_device(self.collate([e], padded=True)), "sum")
                             for e in examples]
                    packed = self._forward(model, self._to_device(self.collate(examples)), "sum")
            except Exception as error:  # a family whose forward refuses packed inputs
                raise ValueError(f"padding_free=True: {what} ({_model_name(model)}) failed to score packed rows "
                                 f"with packing_attention={config.packing_attention!r} ({type(error).__name__}: "
                                 f"{error}). Use padding_free=False.") from error
            finally:
                model.train(was_training)
            # collate's order: every example's chosen rows first, then the rejected ones (or one row per SFT example)
            rows = len(alone[0][0])
            padded = torch.cat([torch.cat([out[0][k::rows] for out in alone]) for k in range(rows)])
            tokens = torch.cat([torch.cat([out[2].sum(dim=1)[k::rows] for out in alone]) for k in range(rows)])
            per_token = float(((packed[0] - padded).abs() / tokens.clamp(min=1)).max())
            worst = self.parallel.maximum(per_token)
            if not worst <= tolerance:
                raise ValueError(
                    f"padding_free=True: {what} ({_model_name(model)}) scores packed rows differently from padded "
                    f"rows with packing_attention={config.packing_attention!r}: up to {worst:.3g} nats per token on "
                    f"the {len(examples)} shortest examples (tolerance {tolerance:g} in {self.compute_dtype}). "
                    f"Training would use wrong log-probabilities. Use padding_free=False (exact on every model), or "
                    f"try packing_attention={other!r}.")

    def logprobs(self, batch: Mapping[str, Tensor] | PackedBatch, *, reference: bool = False,
                 reduction: Reduction | None = None) -> Tensor:
        """Sequence log-probs (N,) of right-padded rows (``input_ids``, ``attention_mask``, ``completion_mask``)
        under the current policy, or under ``pi_ref`` with ``reference=True``; no gradients, eval mode.
        ``reduction`` defaults to the config's (``config.reduction``)."""
        batch = self._to_device(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if not reference:
                    return self._forward(self.model, batch, reduction)[0]
                with self.reference_model() as model:
                    return self._forward(model, batch, reduction)[0]
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[Any]:
        """``with trainer.reference_model() as ref:`` a model that computes ``pi_ref``: ``ref_model``, the PEFT model
        with its reference adapter active or its adapter disabled, or (before the first step) the model itself."""
        if self.ref_model is None and self.ref_adapter_name is None and not is_peft(self.model):
            if self.step > 0:
                raise ValueError("this trainer keeps no reference model (precompute_ref_logps without HyPO or an "
                                 "evaluator): pass ref_model=... to score against pi_ref after training.")
            yield self.model  # before the first step the model is pi_ref
            return
        with as_reference(self.model, ref_model=self.ref_model, ref_adapter_name=self.ref_adapter_name) as model:
            yield model

    def _precompute(self) -> None:
        """Reference log-probs of every pair, (N, 2) chosen/rejected, computed once without gradients."""
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        config = self.config
        if self._ref_logps is not None or config.method == "sft" or not config.precompute_ref_logps:
            return
        size = config.precompute_ref_batch_size or 4 * (config.micro_batch_size or config.batch_size)
        # Each process scores its own block of the data (topped up to the same length), then the blocks are gathered.
        n, ranks, rank = len(self.examples), self.parallel.world_size, self.parallel.rank
        block = math.ceil(n / ranks)
        mine = list(range(rank * block, min(n, (rank + 1) * block)))
        mine += [0] * (block - len(mine))
        starts = range(0, block, size)
        values = []
        with deferred_checks() as checks:
            for start in tqdm(starts, desc="reference log-probs",
                              disable=not config.progress or len(starts) < 2 or not self.parallel.is_main):
                batch = self._to_device(self.collate([self.examples[i] for i in mine[start:start + size]]))
                values.append(self.logprobs(batch, reference=True).view(2, -1).T)
            checks.verify()
        gathered = self.parallel.gather(torch.cat(values).float()).cpu()
        self._ref_logps = torch.cat([gathered[r * block:min(n, (r + 1) * block)] for r in range(ranks)])

    def _to_device(self, batch: Mapping[str, Tensor] | PackedBatch) -> Any:
        if isinstance(batch, PackedBatch):
            return batch.to(self.device)
        return {key: value.to(self.device) for key, value in batch.items()}

    # ------------------------------------------------------------------------------------- sampling API
    def sample(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, k: int = 1, max_new_tokens: int = 32,
               temperature: float = 1.0, generator: torch.Generator | None = None,
               max_rows: int | None = None, reference: bool = False,
               row_seeds: Sequence[int] | None = None) -> Samples:
        """``k`` samples per prompt (text or token ids) from the current policy, or from ``pi_ref`` with
        ``reference=True`` (see ``rpo_lib.sample``; ``row_seeds``: one seed per row, in place of ``generator``)."""
        prompt_ids = [list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]
        with contextlib.ExitStack() as stack:
            model = stack.enter_context(self.reference_model()) if reference else self.model
            with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self._autocast):
                return sample(model, prompt_ids, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                              generator=generator, eos_token_id=self.tokenizer.eos_token_id,
                              pad_token_id=self.pad_token_id, max_rows=max_rows, row_seeds=row_seeds,
                              all_finished=self.parallel.all_finished)

    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        """``(log pi(y|x), log pi_ref(y|x))`` of sampled rows, each (N,), summed over tokens, no gradients."""
        batch = samples.batch()
        return self.logprobs(batch, reduction="sum"), self.logprobs(batch, reference=True, reduction="sum")

    def _online_samples(self, indices: Sequence[int], step: int) -> Samples:
        """HyPO: ``k_online`` samples of the current policy for each prompt of ``indices``, in as few loops as
        ``online_sample_rows`` allows. Row ``j`` of example ``i`` at optimizer step ``step`` draws from its own
        seed (config.seed, step, i, j): the same sample whatever the batch around it, the loop sizes or the
        process that draws it (``rpo_lib.sample``)."""
        config = self.config
        seeds = [row_seed(config.seed, step, i, j) for i in indices for j in range(config.k_online)]
        return self.sample([self.examples[i].prompt_ids for i in indices], k=config.k_online,
                           max_new_tokens=config.online_max_new_tokens, temperature=config.online_temperature,
                           max_rows=self.online_sample_rows, row_seeds=seeds)

    # ----------------------------------------------------------------------------------------- one step
    def _batch_indices(self, step: int) -> list[int]:
        """Example indices of optimizer step ``step``: epochs are seeded permutations cut into batches; a batch
        never spans two epochs (the last one of an epoch is smaller when batch_size does not divide the data)."""
        n, size = len(self.examples), self.config.batch_size
        epoch, position = divmod(step, math.ceil(n / size))
        if self._permutation is None or self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator).tolist()
            if self.config.group_by_length:
                order = _group_by_length(order, [_length(self.examples[i]) for i in range(n)], size, generator)
            self._permutation = (epoch, order)
        return self._permutation[1][position * size:min(n, (position + 1) * size)]

    def _epoch(self, step: int) -> float:
        """Epochs completed after optimizer step ``step`` (0-based)."""
        n, size = len(self.examples), self.config.batch_size
        epoch, position = divmod(step, math.ceil(n / size))
        return epoch + min(n, (position + 1) * size) / n

    def _loss_terms(self, indices: list[int], share: float, token_count: float,
                    samples: Samples | None = None) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """The loss of one micro-batch, weighted by its ``share`` of the batch, as terms to backpropagate one
        after the other, each with its metrics (detached tensors). HyPO yields its offline DPO term first and
        scores its online ``samples`` (drawn for these prompts) only after that term's backward pass."""
        config = self.config
        examples = [self.examples[i] for i in indices]
        if config.method == "sft":
            batch = self._to_device(self.collate(examples))
            _, token_logps, mask = self._forward(self.train_model, batch)
            normalization = config.sft_normalization
            loss = losses.sft_loss(token_logps, mask, normalization=normalization,
                                   token_count=token_count * share if normalization == "token_mean" else None)
            # Metrics are summed with weight `share`: with token_count, share * loss sums to the batch's mean.
            yield loss * share, {"loss/sft": loss.detach()}
            return
        batch = self._to_device(self.collate(examples))
        b = len(examples)
        if self._ref_logps is not None:
            ref = self._ref_logps[indices].to(self.device)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:  # before the policy's forward, so that its working set is gone when the activations are alive
            ref_logps = self.logprobs(batch, reference=True)
            ref_chosen, ref_rejected = ref_logps[:b], ref_logps[b:]
        logps, token_logps, mask = self._forward(self.train_model, batch)
        policy_chosen, policy_rejected = logps[:b], logps[b:]
        pairs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        if config.method == "ipo":
            out = losses.ipo_loss(*pairs, tau=config.beta)
        elif config.method == "rpo":
            rpo = config.rpo_kwargs()
            out = losses.rpo_loss(*pairs, token_logps[:b], mask[:b], beta=config.beta, **rpo,
                                  token_count=token_count * share if rpo["normalization"] == "token_mean" else None)
        else:  # dpo, and the offline part of hypo (docs/math.md section 7)
            out = losses.dpo_loss(*pairs, beta=config.beta)
        yield out.loss * share, out.metric_tensors
        if config.method != "hypo":
            return
        if samples is None or len(samples.completion_ids) != b * config.k_online:
            raise ValueError(f"HyPO needs {config.k_online} online samples for each of the {b} prompts.")
        del logps, token_logps, mask, out, pairs, policy_chosen, policy_rejected  # the offline graph is spent
        online = samples.batch()
        sample_logps = self._forward(self.train_model, online, "sum")[0]  # with gradients: the REINFORCE term
        ref_sample_logps = self.logprobs(online, reference=True, reduction="sum")
        term = losses.hypo_online_term(sample_logps.view(b, config.k_online),
                                       ref_sample_logps.view(b, config.k_online), lam=config.lam)
        yield term.loss * share, term.metric_tensors

    def batch_loss(self, indices: Sequence[int] | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss (with gradients) and metrics of ``self.examples[indices]`` (default: all) as one batch,
        under the current model, without an update: for checks against other implementations. HyPO draws
        fresh online samples (from the trainer's generator) for these prompts."""
        indices = list(range(len(self.examples))) if indices is None else list(indices)
        token_count = float(sum(len(self._completion(self.examples[i])) for i in indices))
        samples = self._online_samples(indices, self.step) if self.config.method == "hypo" else None
        terms = list(self._loss_terms(indices, 1.0, token_count, samples))
        loss = torch.stack([term for term, _ in terms]).sum()
        metrics = {key: value for _, values in terms for key, value in values.items()}
        return loss, losses._as_floats(metrics)

    def _optimizer_step(self, step: int) -> dict[str, float]:
        config = self.config
        batch = self._batch_indices(step)  # the global batch: the same on every process
        size = config.micro_batch_size or config.batch_size
        token_count = float(sum(len(self._completion(self.examples[i])) for i in batch))  # global: RPO, SFT
        # This process's shard; stand-ins (weight 0) keep every process's number of passes the same.
        indices, stand_ins = shard(batch, self.parallel.rank, self.parallel.world_size)
        real = len(indices) - stand_ins
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        with deferred_checks() as checks:
            # HyPO: the whole step's samples first, before any activation is alive (rpo_lib.sample sizes the loops).
            samples = self._online_samples(indices, step) if config.method == "hypo" else None
            chunks = micro_batches(real, len(indices), size)  # a stand-in pass (weight 0) where a shard is short
            for number, (start, stop, weight) in enumerate(chunks):
                chunk = indices[start:stop]
                share = len(chunk) / len(batch)  # of the global batch
                part = samples.rows(start, stop) if samples is not None else None
                with self.parallel.gradient_sync(self.train_model, sync=number == len(chunks) - 1):
                    for loss, metrics in self._loss_terms(chunk, share, token_count, part):
                        loss = loss * weight if weight != 1 else loss
                        self.parallel.backward(loss)
                        totals["loss"] = totals["loss"] + loss.detach() if "loss" in totals else loss.detach()
                        for key, value in metrics.items():
                            value = share * weight * value
                            totals[key] = totals[key] + value if key in totals else value
            grad_norm = self.parallel.clip_grad_norm(self.parameters, config.max_grad_norm)
            names = list(totals)
            summed = self.parallel.sum(torch.stack([totals[k].float().reshape(()) for k in names]))  # one reduction
            totals = dict(zip(names, summed.unbind(), strict=True))
            metrics_read = _read_back({**totals, "grad_norm": grad_norm}, checks)  # the step's one read-back
        for name in ("loss", "grad_norm"):
            if not math.isfinite(metrics_read[name]):
                raise FloatingPointError(
                    f"the {name.replace('_', ' ')} became {metrics_read[name]} at step {step + 1}; the weights were "
                    f"not updated. Lower learning_rate (now {config.learning_rate}) or raise beta; the last "
                    f"checkpoint (if any) is intact.")
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        metrics_read.update({"lr": lr, "epoch": self._epoch(step)})
        return metrics_read

    def _completion(self, example: Any) -> list[int]:
        """The tokens the token-mean SFT term counts: the chosen (or SFT) completion."""
        return example.completion_ids if isinstance(example, SFTExample) else example.chosen_ids

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, *, resume: bool | str | os.PathLike = False, overwrite: bool = False) -> History:
        """Train to ``config.max_steps``; return the history (also ``self.history``).

        Args:
            resume: True resumes from the newest readable checkpoint in ``config.checkpoint_dir``; a path
                resumes from that file; False starts at the current state (a second ``train()`` call continues
                nothing: raise ``max_steps`` with a new config and resume from a checkpoint instead).
            overwrite: for a new run (``resume=False``) in a ``checkpoint_dir`` that already holds checkpoints:
                delete them first. Without it such a run is refused, so that no run's checkpoints are lost or
                mixed with another's.
        """
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        config = self.config
        if resume:
            if overwrite:
                raise ValueError("resume and overwrite exclude each other: resume continues the checkpoints that "
                                 "overwrite would delete.")
            self.load_checkpoint(resume)
        else:
            self._claim_checkpoint_dir(overwrite)
            self._seed_everything()
        self._precompute()
        log = self._run_log()
        if self.step == 0 and self.evaluate is not None and not self.history:
            self.history.append({"step": 0, **self._evaluate()})
            if log is not None:
                log.write(self.history[-1])
        bar = tqdm(total=config.max_steps, initial=self.step, desc=config.method.upper(),
                   disable=not config.progress or not self.parallel.is_main, leave=True)
        try:
            while self.step < config.max_steps:
                started = time.perf_counter()
                row = {"step": self.step + 1, **self._optimizer_step(self.step)}
                self.step += 1
                last = self.step == config.max_steps
                if self.evaluate is not None and (last or (config.eval_every and self.step % config.eval_every == 0)):
                    row.update(self._evaluate())
                self.history.append(row)
                if log is not None:
                    log.write(row)
                self.seconds += time.perf_counter() - started
                postfix = {"loss": f"{row['loss']:.4f}"}
                if "gold/reward" in row:
                    postfix["gold"] = f"{row['gold/reward']:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if config.checkpoint_dir and (last or (config.save_every and self.step % config.save_every == 0)):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            where = latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None  # as it is now
            hint = (f"The last checkpoint, {where}, is intact: trainer.train(resume=True) continues from it."
                    if where else "No checkpoint was written (set checkpoint_dir and save_every to have one).")
            if self.parallel.is_main:
                print(f"Interrupted during step {self.step + 1}. {hint}")
            raise
        finally:
            if log is not None:
                log.close()
        bar.close()
        return self.history

    def _run_log(self) -> RunLog | None:
        """The main process's ``RunLog`` when ``report_to`` names targets (``rpo_lib.run_log``)."""
        config = self.config
        if not config.report_to or not self.parallel.is_main:
            return None
        directory = config.log_dir or (os.path.join(config.checkpoint_dir, "logs") if config.checkpoint_dir else
                                       os.path.join("runs", f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"))
        self.log_dir = Path(directory)
        return RunLog(directory, config.report_to, dataclasses.asdict(config))

    def _claim_checkpoint_dir(self, overwrite: bool) -> None:
        """A new run may write into ``checkpoint_dir`` only if it holds no checkpoints, or if told to delete them."""
        directory = self.config.checkpoint_dir
        if not directory or not checkpoints.checkpoint_files(directory):
            return
        if overwrite:
            self.parallel.barrier()  # every process has looked before the first one deletes
            if self.parallel.is_main:
                removed = checkpoints.remove_checkpoints(directory)
                print(f"rpo_lib.train: deleted {len(removed)} checkpoint file(s) of an earlier run in {directory}.")
            self.parallel.barrier()
            return
        newest = latest_checkpoint(directory)
        raise FileExistsError(
            f"{directory} already holds checkpoints (the newest is {newest}); a new run there would mix its "
            f"checkpoints with those. Continue that run with trainer.train(resume=True), choose another "
            f"checkpoint_dir, or start afresh with trainer.train(overwrite=True), which deletes them.")

    def _evaluate(self) -> dict[str, float]:
        assert self.evaluate is not None
        was_training = self.model.training
        self.model.eval()
        try:
            return dict(self.evaluate(self))
        finally:
            self.model.train(was_training)

    def _seed_everything(self) -> None:
        seed = self.config.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # -------------------------------------------------------------------------------------- checkpoints
    def _trainable_state(self) -> dict[str, Tensor | None]:
        """The trainable tensors, whole (gathered where they are sharded), on the CPU of the first process; the
        others take part in the gathers and hold None (``rpo_lib.parallel``: ``main_copy``)."""
        return {name: self.parallel.main_copy(p) for name, p in self.model.named_parameters() if p.requires_grad}

    def _optimizer_state(self) -> dict[str, Any]:
        """``optimizer.state_dict()`` with every tensor whole on the CPU of the first process (None elsewhere): the
        same on any process count."""
        state = self.optimizer.state_dict()
        state["state"] = {index: {key: self.parallel.main_copy(value) if isinstance(value, Tensor) else value
                                  for key, value in entry.items()} for index, entry in state["state"].items()}
        return state

    def _load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Load a whole optimizer state; where parameters are sharded, keep this process's parts."""
        params = self.parameters
        local = {index: {key: self.parallel.local(value, params[int(index)])
                         if isinstance(value, Tensor) and value.shape == params[int(index)].shape else value
                         for key, value in entry.items()} for index, entry in state["state"].items()}
        self.optimizer.load_state_dict({**state, "state": local})

    def _run_description(self) -> dict[str, Any]:
        """What makes a run this run: its settings, its data and the shapes of what it trains."""
        shapes = {name: list(p.shape) for name, p in self.model.named_parameters() if p.requires_grad}
        settings = {name: os.fspath(value) if isinstance(value, os.PathLike) else value
                    for name, value in dataclasses.asdict(self.config).items()}
        return {"config": settings, "data": self.data_fingerprint, "trainable": shapes}

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint atomically (``rpo_lib.checkpoints``); keep the newest ``keep_checkpoints``.

        With many processes every process must call it (sharded tensors are gathered); the first one writes."""
        if path is None:
            if not self.config.checkpoint_dir:
                raise ValueError("no checkpoint_dir in the config: pass a path or set checkpoint_dir.")
            path = Path(self.config.checkpoint_dir) / checkpoints.checkpoint_name(self.step)
        state = {
            "format": checkpoints.FORMAT,
            "step": self.step,
            "weights": self._trainable_state(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "history": [dict(row) for row in self.history],
            "seconds": self.seconds,
            "online_sample_rows": self.online_sample_rows,
            "rng": _rng_state(),
            "run": self._run_description(),
            "ref_logps": self._ref_logps,
        }
        path = Path(path)
        if self.parallel.is_main:
            checkpoints.write_atomic(state, path)
            if self.config.checkpoint_dir and path.parent.resolve() == Path(self.config.checkpoint_dir).resolve():
                checkpoints.rotate(path.parent, self.config.keep_checkpoints)
        self.parallel.barrier()  # nobody goes on (or reads it) before it is written
        return path

    def _differences(self, state: Mapping[str, Any]) -> list[str]:
        """How the checkpoint's run differs from this trainer's, one line each (empty: the same run)."""
        saved, mine = state["run"], self._run_description()
        lines = []
        for name, value in mine["config"].items():
            if name in RESUME_FREE:
                continue
            before = saved["config"].get(name, "(not recorded)")
            if (list(before) if isinstance(before, (tuple, list)) else before) != (
                    list(value) if isinstance(value, (tuple, list)) else value):
                lines.append(f"{name}: {before!r} in the checkpoint, {value!r} now")
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

    def load_checkpoint(self, where: bool | str | os.PathLike = True) -> Path:
        """Restore weights, optimizer, schedule, RNG states and history from a checkpoint file.

        ``where=True``: the newest readable checkpoint of ``config.checkpoint_dir`` (unreadable newer files are
        named and skipped). Nothing is loaded unless the checkpoint belongs to this run: the settings (except
        those in ``RESUME_FREE``), the data's fingerprint and the trainable tensors' names and shapes must agree;
        the error lists every difference.
        """
        if where is True:
            if not self.config.checkpoint_dir:
                raise ValueError("resume=True needs config.checkpoint_dir (or pass resume=<checkpoint file>).")
            path, state, skipped = checkpoints.newest_readable(self.config.checkpoint_dir)
            for error in skipped if self.parallel.is_main else ():
                print(f"rpo_lib.train: skipping {error.path.name}: {error.problem} Resuming from {path.name}, the "
                      f"newest intact checkpoint, instead.")
        else:
            path = Path(where)  # type: ignore[arg-type]
            state = checkpoints.read(path)
        differences = self._differences(state)
        if differences:
            raise ValueError(f"{path} was written by another run; resuming it with this trainer would continue "
                             f"something else. What differs:\n  - " + "\n  - ".join(differences) +
                             "\nResume with the same settings, data and model, or start afresh in another "
                             "checkpoint_dir (or with train(overwrite=True)).")
        weights = state["weights"]
        trainable = dict((name, p) for name, p in self.model.named_parameters() if p.requires_grad)
        if set(weights) != set(trainable) or any(list(weights[n].shape) != list(p.shape) for n, p in trainable.items()):
            raise ValueError(f"{path}: its weights do not match its own description of the run (damaged file?); "
                             f"nothing was loaded.")
        saved_steps = state["run"]["config"].get("max_steps")
        if saved_steps != self.config.max_steps and self.parallel.is_main:
            print(f"rpo_lib.train: the checkpoint's run had max_steps={saved_steps}; this one has "
                  f"{self.config.max_steps}, and its learning-rate schedule follows the new length.")
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(self.parallel.local(weights[name], parameter))
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = History(state["history"])
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        if self.config.online_sample_rows is None and state.get("online_sample_rows") is not None:
            self.online_sample_rows = int(state["online_sample_rows"])  # cut the samples as the run did
        _set_rng_state(state["rng"])
        self._ref_logps = state["ref_logps"]
        return path

    def save_model(self, directory: str | os.PathLike) -> None:
        """``save_pretrained`` of the model (the trained adapter only, for PEFT) and the tokenizer.

        With many processes every process must call it (sharded weights are gathered); the first one writes."""
        peft = is_peft(self.model)
        state = self._trainable_state() if peft else {
            name: self.parallel.main_copy(value) for name, value in self.model.state_dict().items()}
        if self.parallel.is_main:
            options = {"selected_adapters": [self.model.active_adapter]} if peft else {}
            self.model.save_pretrained(directory, state_dict=state, **options)
            self.tokenizer.save_pretrained(directory)
        self.parallel.barrier()
