"""What a run is: ``TrainConfig``, the rules every field obeys, and the named starting points (``PRESETS``).

Each field has a typed rule in ``FIELD_RULES`` (a number with its bound, a choice, a flag, text ...); making a
config checks every field and then how fields fit together, and the error lists every problem at once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from rpo_lib import losses, papers
from rpo_lib.run_log import REPORT_TARGETS

__all__ = ["FIELD_RULES", "METHODS", "PRESETS", "RESUME_FREE", "Method", "Reduction", "Schedule", "TrainConfig",
           "config_problems", "preset"]

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
    device: str | None = None  # None: the launcher's GPU, else CUDA, then MPS, then CPU (rpo_lib.env.device)

    def __post_init__(self) -> None:
        problems = config_problems(self)
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems) + ".")

    @property
    def reduction(self) -> Reduction:
        """How the offline pairs' token log-probs are reduced: ``logp_reduction``, or the method's own (the sum
        for DPO, RPO and HyPO; the mean for IPO, the IPO authors' form and TRL's)."""
        if self.logp_reduction is not None:
            return self.logp_reduction
        return "mean" if self.method == "ipo" else "sum"

    @property
    def micro_batch(self) -> int:
        """Pairs per forward/backward pass: ``micro_batch_size``, or the whole batch."""
        return self.micro_batch_size or self.batch_size

    def rpo_kwargs(self) -> dict:
        """``rpo_loss``'s normalisation and coefficient: ``eta`` or ``sft_weight`` as set, else the variant's."""
        variant = losses.RPO_VARIANTS[self.rpo_variant]
        if self.eta is not None:
            return {"normalization": variant.normalization, "eta": self.eta}
        if self.sft_weight is not None:
            return {"normalization": variant.normalization, "sft_weight": self.sft_weight}
        return variant.kwargs()


# ------------------------------------------------------------------------------------------ field rules
class Rule(Protocol):
    def problem(self, name: str, value: Any) -> str | None:
        """A clause saying what is wrong with ``value`` and what it must be; None when it is fine."""


@dataclass(frozen=True)
class Number:
    """A finite number at or above ``low`` (strictly above with ``strict``); ``whole``: an integer."""

    low: float
    strict: bool = False
    whole: bool = False
    optional: bool = False

    def problem(self, name: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.whole else numbers.Real):
            kind = "a whole number" if self.whole else "a finite number"
            return f"{name} must be {kind}; got {value!r} ({type(value).__name__})"
        if not math.isfinite(value):
            return f"{name} must be a finite number; got {value!r}"
        if value < self.low or (self.strict and value == self.low):
            low = int(self.low) if float(self.low).is_integer() else self.low
            return f"{name} must be {'>' if self.strict else '>='} {low}; got {value!r}"
        return None


@dataclass(frozen=True)
class Choice:
    """One of ``options``."""

    options: tuple[Any, ...]
    optional: bool = False

    def problem(self, name: str, value: Any) -> str | None:
        if (value is None and self.optional) or value in self.options:
            return None
        return f"{name} must be one of {list(self.options)}; got {value!r}"


@dataclass(frozen=True)
class Flag:
    """True or False (not 0, 1 or a string)."""

    def problem(self, name: str, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"{name} must be True or False; got {value!r}"


@dataclass(frozen=True)
class Text:
    """A string or a path; None allowed."""

    def problem(self, name: str, value: Any) -> str | None:
        return None if value is None or isinstance(value, (str, os.PathLike)) else f"{name} must be text; got {value!r}"


@dataclass(frozen=True)
class Several:
    """A tuple (or list) of some of ``options``."""

    options: tuple[str, ...]

    def problem(self, name: str, value: Any) -> str | None:
        ok = isinstance(value, (tuple, list)) and all(isinstance(v, str) and v in self.options for v in value)
        return None if ok else f"{name} must be a tuple of {list(self.options)}; got {value!r}"


@dataclass(frozen=True)
class AdamBetas:
    """Two numbers in [0, 1)."""

    def problem(self, name: str, value: Any) -> str | None:
        ok = (isinstance(value, (tuple, list)) and len(value) == 2
              and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= float(b) < 1 for b in value))
        return None if ok else f"{name} must be two numbers in [0, 1), e.g. (0.9, 0.999); got {value!r}"


def _positive(optional: bool = False) -> Number:
    return Number(0, strict=True, optional=optional)


def _count(low: int, optional: bool = False) -> Number:
    return Number(low, whole=True, optional=optional)


# What each field may hold. tests/test_train.py checks that every field has a rule.
FIELD_RULES: dict[str, Rule] = {
    "method": Choice(METHODS), "beta": _positive(), "rpo_variant": Choice(tuple(losses.RPO_VARIANTS)),
    "eta": Number(0, optional=True), "sft_weight": Number(0, optional=True),
    "sft_normalization": Choice(("sum", "seq_mean", "token_mean")), "lam": Number(0), "k_online": _count(1),
    "online_max_new_tokens": _count(1), "online_temperature": _positive(),
    "logp_reduction": Choice(("sum", "mean"), optional=True),
    "learning_rate": _positive(), "weight_decay": Number(0), "adam_betas": AdamBetas(), "warmup_steps": _count(0),
    "lr_schedule": Choice(("constant", "linear", "cosine")), "max_grad_norm": _positive(optional=True),
    "batch_size": _count(1), "micro_batch_size": _count(1, optional=True), "max_steps": _count(1),
    "max_length": _count(2), "max_prompt_length": _count(1, optional=True),
    "prompt_truncation": Choice(("keep_end", "drop")), "parse_special_tokens": Flag(), "max_cut_share": Number(0),
    "strict": Flag(), "gradient_checkpointing": Flag(), "padding_free": Flag(),
    "packing_attention": Choice(("mask", "varlen")), "group_by_length": Flag(), "disable_dropout": Flag(),
    "seed": _count(0), "precompute_ref_logps": Flag(), "precompute_ref_batch_size": _count(1, optional=True),
    "online_sample_rows": _count(1, optional=True), "eval_every": _count(0), "checkpoint_dir": Text(),
    "save_every": _count(0), "keep_checkpoints": _count(1), "progress": Flag(), "report_to": Several(REPORT_TARGETS),
    "log_dir": Text(), "device": Text(),
}


def config_problems(config: TrainConfig) -> list[str]:
    """Every problem of ``config``, each a clause that says what to fix: first each field against its rule,
    then (when every field is well typed) how the fields fit together."""
    problems = [problem for item in dataclasses.fields(config)
                if (problem := FIELD_RULES[item.name].problem(item.name, getattr(config, item.name)))]
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


# ------------------------------------------------------------------------------------------------ presets
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


def preset(name: str, **changes: Any) -> TrainConfig:
    """``PRESETS[name]`` with ``changes`` applied: ``preset("tiny", method="hypo", lam=0.1)``."""
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r}; the presets are {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **changes)


# Settings that may differ on resume: they change how a step is computed or recorded, not what it computes
# (accumulation is exact, evaluations and checkpoints do not touch training). max_steps may grow: the
# schedule is then computed for the new length (a note says so).
RESUME_FREE = frozenset({"micro_batch_size", "gradient_checkpointing", "padding_free", "packing_attention",
                         "precompute_ref_batch_size",
                         "online_sample_rows", "eval_every", "checkpoint_dir", "save_every", "keep_checkpoints",
                         "progress", "device", "max_steps", "max_cut_share", "strict", "report_to", "log_dir"})


def settings(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (paths as strings): what a checkpoint and a run log record."""
    return {name: os.fspath(value) if isinstance(value, os.PathLike) else value
            for name, value in dataclasses.asdict(config).items()}


def _same(before: Any, now: Any) -> bool:
    """Equal settings, a tuple and a list of the same items included (a checkpoint stores tuples as lists)."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (tuple, list)) else value
    return bool(plain(before) == plain(now))


def setting_differences(saved: dict[str, Any], config: TrainConfig, free: Sequence[str] = tuple(RESUME_FREE)
                        ) -> list[str]:
    """One line per setting of ``config`` that differs from the recorded ``saved`` settings, except ``free``."""
    return [f"{name}: {saved.get(name, '(not recorded)')!r} in the checkpoint, {value!r} now"
            for name, value in settings(config).items()
            if name not in free and not _same(saved.get(name, "(not recorded)"), value)]
