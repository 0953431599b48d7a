"""One trainer for SFT, DPO, IPO, RPO and HyPO on any Hugging Face causal LM (full fine-tuning or LoRA).

::

    from rpo_lib.train import Trainer, preset
    config = preset("tiny", method="rpo", eta=1.0, max_steps=300)
    trainer = Trainer(model, tokenizer, rows, config)        # rows: {"prompt", "chosen", "rejected"}
    history = trainer.train()                                # resume later with trainer.train(resume=True)
    steps, margins = history.series("rewards/margins")

The losses are ``rpo_lib.losses``' pure functions; this module feeds them: it tokenizes and checks the rows
(``rpo_lib.data``; dropped rows are reported), computes log-probabilities (``rpo_lib.logprobs``; summed over
completion tokens unless ``logp_reduction="mean"``), gets the reference's log-probabilities, draws HyPO's
online samples (``rpo_lib.sample``), accumulates gradients over micro-batches, steps AdamW with warm-up and
a schedule, logs, evaluates and checkpoints.

The reference policy ``pi_ref`` is, in this order: the ``ref_model`` you pass; for a PEFT model, the same
model with its adapter disabled (no second copy in memory); otherwise a frozen copy of the model as it is
when the trainer is made. ``precompute_ref_logps=True`` scores the pairs once under ``pi_ref`` before
training; for full fine-tuning without HyPO or an evaluator this also avoids the copy.

Gradient accumulation is exact: a micro-batch's loss is weighted by its share of the batch's pairs, and the
token-mean SFT normalisation divides by the whole batch's token count, so one step on ``batch_size`` pairs
gives the same update whatever ``micro_batch_size`` is (tests/test_train.py checks it).

Checkpoints (``checkpoint_dir``) are single files written to a temporary name and renamed into place, so an
interruption (Ctrl-C, a crash, a full disk) never leaves a half-written file where the last good checkpoint
stood. A checkpoint holds the trainable weights, optimizer, schedule, RNG states and history; resuming from
one reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from rpo_lib import losses
from rpo_lib.data import SFTExample, collate_preferences, collate_sft, tokenize_preferences, tokenize_sft
from rpo_lib.logprobs import completion_logprobs
from rpo_lib.sample import Samples, sample

__all__ = ["METHODS", "PRESETS", "History", "Method", "TrainConfig", "Trainer", "latest_checkpoint", "preset"]

Method = Literal["sft", "dpo", "ipo", "rpo", "hypo"]
METHODS = ("sft", "dpo", "ipo", "rpo", "hypo")
Schedule = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model, the tokenizer and the data. Defaults suit a tiny CPU model.

    Use ``preset(name, **changes)`` for the named starting points in ``PRESETS``.
    """

    # --- what to optimise (math.md sections 3, 6, 7) -------------------------------------------------
    method: Method = "dpo"
    beta: float = 0.1  # KL strength of DPO/RPO/HyPO; IPO's tau (TRL's convention)
    eta: float = 1.0  # RPO: weight of the SFT term on chosen responses
    rpo_variant: str = "trl"  # RPO's SFT normalisation: a key of rpo_lib.losses.RPO_VARIANTS
    sft_normalization: losses.Normalization = "token_mean"  # method="sft": how the NLL is averaged
    lam: float = 0.05  # HyPO: weight of the online reverse KL
    k_online: int = 2  # HyPO: samples per prompt (RLOO needs >= 2)
    online_max_new_tokens: int = 32  # HyPO: longest online sample
    online_temperature: float = 1.0  # HyPO: sampling temperature (1 = the policy itself, as the KL needs)
    logp_reduction: Literal["sum", "mean"] = "sum"  # log pi(y|x) over tokens: "sum" is the exact log-prob
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
    max_prompt_length: int | None = None  # drop rows (counted) whose prompt is longer
    gradient_checkpointing: bool = False  # trade compute for activation memory (large models)
    seed: int = 0  # data order, online samples and every other random draw
    # --- bookkeeping -------------------------------------------------------------------------------------
    eval_every: int = 0  # run the evaluator every this many steps (and before and after); 0: before/after only
    checkpoint_dir: str | None = None  # where checkpoints go; None: no checkpoints
    save_every: int = 0  # checkpoint every this many steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    precompute_ref_logps: bool = False  # score the pairs under pi_ref once, before training
    progress: bool = True  # a tqdm progress bar with the live loss
    device: str | None = None  # None: CUDA, then MPS, then CPU

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}; got {self.method!r}")
        if self.rpo_variant not in losses.RPO_VARIANTS:
            problems.append(f"rpo_variant must be one of {sorted(losses.RPO_VARIANTS)}; got {self.rpo_variant!r}")
        if self.sft_normalization not in ("sum", "seq_mean", "token_mean"):
            problems.append(f"sft_normalization must be sum, seq_mean or token_mean; got {self.sft_normalization!r}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            problems.append(f"lr_schedule must be constant, linear or cosine; got {self.lr_schedule!r}")
        if self.logp_reduction not in ("sum", "mean"):
            problems.append(f"logp_reduction must be 'sum' or 'mean'; got {self.logp_reduction!r}")
        for name in ("beta", "learning_rate", "batch_size", "max_steps", "max_length", "online_max_new_tokens"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("eta", "lam", "weight_decay", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.micro_batch_size is not None and not 0 < self.micro_batch_size <= self.batch_size:
            problems.append(f"micro_batch_size must lie in [1, batch_size={self.batch_size}]; "
                            f"got {self.micro_batch_size}")
        if self.method == "hypo" and self.k_online < 2:
            problems.append(f"HyPO's RLOO estimate needs k_online >= 2; got {self.k_online}")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1; got {self.keep_checkpoints}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems) + ".")


PRESETS: dict[str, TrainConfig] = {
    # A ~0.1M-parameter model on a 2-core CPU (notebook 07): a few seconds per 100 steps.
    "tiny": TrainConfig(learning_rate=1e-3, batch_size=16, max_length=48, warmup_steps=10, max_steps=300,
                        lam=0.05, online_max_new_tokens=16),
    # A 7B model in 4-bit with a LoRA adapter on one 24-80 GB GPU. beta and eta are Liu et al.'s published
    # zephyr-7b-beta values with the alignment-handbook normalisation (RPO_VARIANTS["handbook"]); the learning
    # rate is a usual LoRA DPO value. 64 pairs per step = 32 micro-batches of 2; one UltraFeedback epoch
    # (~61k pairs) is ~950 steps.
    "qlora_7b": TrainConfig(method="rpo", beta=0.01, eta=0.005, rpo_variant="handbook", learning_rate=5e-5,
                            batch_size=64, micro_batch_size=2, max_length=1024, max_prompt_length=512,
                            warmup_steps=50, lr_schedule="cosine", max_steps=950, gradient_checkpointing=True,
                            lam=1e-4, online_max_new_tokens=256, precompute_ref_logps=False, save_every=100),
}


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


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint file in ``directory`` (temporary files are ignored), or None."""
    files = sorted(Path(directory).glob("checkpoint-*.pt"))
    return files[-1] if files else None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


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


class Trainer:
    """Trains ``model`` with ``config.method`` on ``rows``; see the module docstring.

    Args:
        model: a Hugging Face causal LM, or a PEFT model wrapping one (only trainable parameters are updated).
        tokenizer: its tokenizer (needs an EOS token; the pad token falls back to EOS).
        rows: SFT rows ``{"prompt", "completion"}`` for ``method="sft"``, else preference rows
            ``{"prompt", "chosen", "rejected"}``; a list of dicts or a ``datasets.Dataset``.
        config: a ``TrainConfig`` (``preset("tiny")`` etc.).
        ref_model: the reference policy, if not the model itself as it is now (see the module docstring).
        evaluate: ``evaluate(trainer) -> {name: float}``, run before training, every ``eval_every`` steps and
            at the end; its metrics go into the history (``rpo_lib.tasks.TopicTask.evaluator`` is one).
    """

    def __init__(self, model: Any, tokenizer: Any, rows: Iterable[Mapping[str, Any]], config: TrainConfig, *,
                 ref_model: Any = None, evaluate: Callable[[Trainer], dict[str, float]] | None = None) -> None:
        from rpo_lib.env import device as pick_device

        self.config = config
        self.tokenizer = tokenizer
        self.evaluate = evaluate
        self.device = pick_device(config.device)
        self.model = self._place(model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokenize = tokenize_sft if config.method == "sft" else tokenize_preferences
        self.examples: list[Any]
        self.examples, self.report = tokenize(rows, tokenizer, max_length=config.max_length,
                                              max_prompt_length=config.max_prompt_length)
        if self.report.n_dropped or self.report.truncated:
            print(f"rpo_lib.train: {self.report}")  # nothing is dropped silently (rpo_lib.data)
        self.history = History()
        self.seconds = 0.0
        self.step = 0
        self._ref_logps: Tensor | None = None
        self.ref_model = self._reference(ref_model)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere): unfreeze "
                             "them, or add a LoRA adapter (rpo_lib.models.with_lora).")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, config))
        self.online_generator = torch.Generator().manual_seed(config.seed + 1)
        self._permutations: dict[int, Tensor] = {}

    # ------------------------------------------------------------------------------------------- set-up
    def _place(self, model: Any) -> Any:
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if not quantized and getattr(model, "hf_device_map", None) is None:
            model = model.to(self.device)
        else:
            self.device = next(model.parameters()).device
        return model

    def _reference(self, ref_model: Any) -> Any:
        config = self.config
        if ref_model is not None:  # used under torch.no_grad; its requires_grad flags are left as they are
            return self._place(ref_model).eval()
        if _is_peft(self.model):
            return None  # the model with its adapter disabled
        needs_model = config.method == "hypo" or self.evaluate is not None or (
            config.method != "sft" and not config.precompute_ref_logps)
        if not needs_model:
            return None
        return copy.deepcopy(self.model).eval().requires_grad_(False)

    def _forward(self, model: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``completion_logprobs`` of right-padded rows: (sequence log-probs, token log-probs, mask)."""
        return completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                   reduction=self.config.logp_reduction)

    def logprobs(self, batch: Mapping[str, Tensor], *, reference: bool = False) -> Tensor:
        """Sequence log-probs (N,) of right-padded rows (``input_ids``, ``attention_mask``, ``completion_mask``)
        under the current policy, or under ``pi_ref`` with ``reference=True``; no gradients, eval mode."""
        batch = self._to_device(dict(batch))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if not reference:
                    return self._forward(self.model, batch)[0]
                if self.ref_model is not None:
                    return self._forward(self.ref_model, batch)[0]
                if _is_peft(self.model):
                    with self.model.disable_adapter():
                        return self._forward(self.model, batch)[0]
                if self.step > 0:
                    raise ValueError("this trainer keeps no reference model (precompute_ref_logps without HyPO or "
                                     "an evaluator): pass ref_model=... to score against pi_ref after training.")
                return self._forward(self.model, batch)[0]  # before the first step the model is pi_ref
        finally:
            self.model.train(was_training)

    def _precompute(self) -> None:
        """Reference log-probs of every pair, (N, 2) chosen/rejected, computed once."""
        if self._ref_logps is not None or self.config.method == "sft" or not self.config.precompute_ref_logps:
            return
        values = []
        size = self.config.micro_batch_size or self.config.batch_size
        for start in range(0, len(self.examples), size):
            chunk = self.examples[start:start + size]
            batch = self._to_device(collate_preferences(chunk, self.pad_token_id))
            values.append(self.logprobs(batch, reference=True).view(2, -1).T.cpu())
        self._ref_logps = torch.cat(values)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    # ------------------------------------------------------------------------------------- sampling API
    def sample(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, k: int = 1, max_new_tokens: int = 32,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Samples:
        """``k`` samples per prompt (text or token ids) from the current policy (see ``rpo_lib.sample``)."""
        prompt_ids = [list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]
        return sample(self.model, prompt_ids, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                      generator=generator, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_token_id)

    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        """``(log pi(y|x), log pi_ref(y|x))`` of sampled rows, each (N,), without gradients."""
        batch = samples.batch()
        return self.logprobs(batch), self.logprobs(batch, reference=True)

    # ----------------------------------------------------------------------------------------- one step
    def _batch_indices(self, step: int) -> list[int]:
        """Example indices of optimizer step ``step``: a fresh seeded permutation every epoch."""
        n, size = len(self.examples), self.config.batch_size
        indices = []
        for position in range(step * size, (step + 1) * size):
            epoch = position // n
            if epoch not in self._permutations:
                generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._permutations = {epoch: torch.randperm(n, generator=generator)}
            indices.append(int(self._permutations[epoch][position % n]))
        return indices

    def _micro_loss(self, indices: list[int], share: float, token_count: float) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch, weighted by its ``share`` of the batch, and its metrics."""
        config = self.config
        examples = [self.examples[i] for i in indices]
        if config.method == "sft":
            batch = self._to_device(collate_sft(examples, self.pad_token_id))
            _, token_logps, mask = self._forward(self.model, batch)
            normalization = config.sft_normalization
            loss = losses.sft_loss(token_logps, mask, normalization=normalization,
                                   token_count=token_count * share if normalization == "token_mean" else None)
            # Metrics are summed with weight `share`: with token_count, share * loss sums to the batch's mean.
            return loss * share, {"loss/sft": float(loss.detach())}
        batch = self._to_device(collate_preferences(examples, self.pad_token_id))
        b = len(examples)
        logps, token_logps, mask = self._forward(self.model, batch)
        policy_chosen, policy_rejected = logps[:b], logps[b:]
        if self._ref_logps is not None:
            ref = self._ref_logps[indices].to(self.device)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            ref_logps = self.logprobs(batch, reference=True)
            ref_chosen, ref_rejected = ref_logps[:b], ref_logps[b:]
        pairs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        if config.method == "dpo":
            out = losses.dpo_loss(*pairs, beta=config.beta)
        elif config.method == "ipo":
            out = losses.ipo_loss(*pairs, tau=config.beta)
        elif config.method == "rpo":
            variant = losses.RPO_VARIANTS[config.rpo_variant]
            out = losses.rpo_loss(*pairs, token_logps[:b], mask[:b], beta=config.beta, eta=config.eta,
                                  **variant.kwargs(),
                                  token_count=token_count * share if variant.normalization == "token_mean" else None)
        else:  # hypo
            samples = self.sample([e.prompt_ids for e in examples], k=config.k_online,
                                  max_new_tokens=config.online_max_new_tokens,
                                  temperature=config.online_temperature, generator=self.online_generator)
            online = samples.batch()
            sample_logps = self._forward(self.model, online)[0]  # with gradients: the REINFORCE term
            ref_sample_logps = self.logprobs(online, reference=True)
            out = losses.hypo_loss(*pairs, sample_logps.view(b, config.k_online),
                                   ref_sample_logps.view(b, config.k_online), beta=config.beta, lam=config.lam)
        return out.loss * share, dict(out.metrics)

    def batch_loss(self, indices: Sequence[int] | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss (with gradients) and metrics of ``self.examples[indices]`` (default: all) as one batch,
        under the current model, without an update: for checks against other implementations."""
        indices = list(range(len(self.examples))) if indices is None else list(indices)
        token_count = float(sum(len(self._completion(self.examples[i])) for i in indices))
        return self._micro_loss(indices, 1.0, token_count)

    def _optimizer_step(self, step: int) -> dict[str, float]:
        config = self.config
        indices = self._batch_indices(step)
        size = config.micro_batch_size or config.batch_size
        chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
        token_count = float(sum(len(self._completion(self.examples[i])) for i in indices))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        total = 0.0
        for chunk in chunks:
            share = len(chunk) / len(indices)
            loss, chunk_metrics = self._micro_loss(chunk, share, token_count)
            loss.backward()
            total += float(loss.detach())
            for key, value in chunk_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + share * value
        if config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters
                                                              if p.grad is not None]))
        if not math.isfinite(total):
            raise FloatingPointError(
                f"the loss became {total} at step {step + 1}: lower learning_rate (now {config.learning_rate}) or "
                f"raise beta; the last checkpoint (if any) is intact.")
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        metrics.update({"loss": total, "grad_norm": float(grad_norm), "lr": lr,
                        "epoch": (step + 1) * config.batch_size / len(self.examples)})
        return metrics

    def _completion(self, example: Any) -> list[int]:
        """The tokens the token-mean SFT term counts: the chosen (or SFT) completion."""
        return example.completion_ids if isinstance(example, SFTExample) else example.chosen_ids

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, *, resume: bool | str | os.PathLike = False) -> History:
        """Train to ``config.max_steps``; return the history (also ``self.history``).

        Args:
            resume: True resumes from the newest checkpoint in ``config.checkpoint_dir``; a path resumes from
                that file; False starts at the current state (a second ``train()`` call continues nothing:
                raise ``max_steps`` with a new config and resume from a checkpoint instead).
        """
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        config = self.config
        if resume:
            self.load_checkpoint(resume)
        else:
            self._seed_everything()
        self._precompute()
        if self.step == 0 and self.evaluate is not None and not self.history:
            self.history.append({"step": 0, **self._evaluate()})
        bar = tqdm(total=config.max_steps, initial=self.step, desc=config.method.upper(), disable=not config.progress,
                   leave=True)
        saved_at = None
        try:
            while self.step < config.max_steps:
                started = time.perf_counter()
                row = {"step": self.step + 1, **self._optimizer_step(self.step)}
                self.step += 1
                last = self.step == config.max_steps
                if self.evaluate is not None and (last or (config.eval_every and self.step % config.eval_every == 0)):
                    row.update(self._evaluate())
                self.history.append(row)
                self.seconds += time.perf_counter() - started
                postfix = {"loss": f"{row['loss']:.4f}"}
                if "gold/reward" in row:
                    postfix["gold"] = f"{row['gold/reward']:.2f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if config.checkpoint_dir and (last or (config.save_every and self.step % config.save_every == 0)):
                    saved_at = self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            where = saved_at or (latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None)
            hint = (f"The last checkpoint, {where}, is intact: trainer.train(resume=True) continues from it."
                    if where else "No checkpoint was written (set checkpoint_dir and save_every to have one).")
            print(f"Interrupted during step {self.step + 1}. {hint}")
            raise
        bar.close()
        return self.history

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
    def _trainable_state(self) -> dict[str, Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint atomically (temporary file, then rename); keep the newest ``keep_checkpoints``."""
        if path is None:
            if not self.config.checkpoint_dir:
                raise ValueError("no checkpoint_dir in the config: pass a path or set checkpoint_dir.")
            directory = Path(self.config.checkpoint_dir)
            path = directory / f"checkpoint-{self.step:06d}.pt"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": 1,
            "step": self.step,
            "weights": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": list(self.history),
            "seconds": self.seconds,
            "online_generator": self.online_generator.get_state(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "config": dataclasses.asdict(self.config),
            "ref_logps": self._ref_logps,
        }
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # atomic: the old file or the new one, never half of one
        if self.config.checkpoint_dir and path.parent == Path(self.config.checkpoint_dir):
            for old in sorted(path.parent.glob("checkpoint-*.pt"))[:-self.config.keep_checkpoints]:
                old.unlink()
        return path

    def load_checkpoint(self, where: bool | str | os.PathLike = True) -> Path:
        """Restore weights, optimizer, schedule, RNG states and history from a checkpoint file."""
        if where is True:
            if not self.config.checkpoint_dir:
                raise ValueError("resume=True needs config.checkpoint_dir (or pass resume=<checkpoint file>).")
            found = latest_checkpoint(self.config.checkpoint_dir)
            if found is None:
                raise FileNotFoundError(f"no checkpoint in {self.config.checkpoint_dir}: train without resume to "
                                        f"start from the beginning.")
            path = found
        else:
            path = Path(where)  # type: ignore[arg-type]
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        for key in ("method", "batch_size", "seed"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(f"{path} was written with {key}={saved[key]!r} but this config has "
                                 f"{getattr(self.config, key)!r}: resume with the same {key}.")
        missing = self.model.load_state_dict(state["weights"], strict=False)
        unexpected = [key for key in missing.unexpected_keys]
        if unexpected:
            raise ValueError(f"{path} holds weights this model does not have ({unexpected[:3]} ...): "
                             f"resume with the same model (and adapter).")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = History(state["history"])
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        self.online_generator.set_state(state["online_generator"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self._ref_logps = state["ref_logps"]
        return path

    def save_model(self, directory: str | os.PathLike) -> None:
        """``save_pretrained`` of the model (the adapter only, for PEFT) and the tokenizer."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

