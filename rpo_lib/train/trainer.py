"""The ``Trainer``: set-up, the one training loop, and checkpoints. What a step computes is ``rpo_lib.train.steps``',
which examples it takes ``rpo_lib.train.batches``', and who ``pi_ref`` is ``rpo_lib.train.reference``'s.

Gradient accumulation is exact: a micro-batch's loss is weighted by its share of the batch's pairs, and the
token-mean SFT normalisation divides by the whole batch's token count, so one step on ``batch_size`` pairs gives
the same update whatever ``micro_batch_size`` is (tests/test_train.py checks it). HyPO draws the whole step's
online samples first, in as few generation loops as the KV cache's memory allows (``online_sample_rows``),
before any activation is alive.

The device is read back once per step: metrics stay tensors on the device, the input checks of the losses are
recorded and verified together with them (``rpo_lib._checks.deferred_checks``), and a non-finite loss or gradient
norm stops the run before the optimizer steps.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from rpo_lib import checkpoints, env, losses
from rpo_lib._checks import DeferredChecks, deferred_checks
from rpo_lib.checkpoints import latest_checkpoint
from rpo_lib.data import (SFTExample, collate_preferences, collate_sft, fingerprint, tokenize_preferences,
                          tokenize_sft)
from rpo_lib.log import get_logger
from rpo_lib.logprobs import completion_logprobs, reduce_token_logprobs
from rpo_lib.models import (base_model, compute_dtype, disable_dropout, enable_checkpointing, find_dropout, is_peft,
                            keep_4bit_trainable_on_cpu)
from rpo_lib.packing import PackedBatch, pack_sequences, packed_token_logprobs
from rpo_lib.parallel import SingleProcess, micro_batches, shard
from rpo_lib.run_log import RunLog
from rpo_lib.sample import Samples, row_seed, rows_that_fit, sample
from rpo_lib.train import batches, resume
from rpo_lib.train.config import Reduction, TrainConfig, settings
from rpo_lib.train.packed_check import check_packing
from rpo_lib.train.reference import Reference
from rpo_lib.train.steps import STEPS

__all__ = ["History", "Trainer"]

log = get_logger(__name__)

_GPU_MEMORY_FOR_SAMPLING = 0.5  # share of the GPU memory left after loading that HyPO's KV cache may take


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


def read_back(values: Mapping[str, Tensor], checks: DeferredChecks | None = None) -> dict[str, float]:
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


class Trainer:
    """Trains ``model`` with ``config.method`` on ``rows``; see ``rpo_lib.train``'s docstring.

    Args:
        model: a Hugging Face causal LM, or a PEFT model wrapping one (only trainable parameters are updated).
        tokenizer: its tokenizer (needs an EOS token; the pad token falls back to EOS).
        rows: SFT rows (``{"prompt", "completion"}`` or ``{"messages"}``) for ``method="sft"``, else preference
            rows (``{"prompt", "chosen", "rejected"}``, or chats: see ``rpo_lib.data``); a list of dicts or a
            ``datasets.Dataset``.
        config: a ``TrainConfig`` (``preset("tiny")`` etc.).
        ref_model: the reference policy, if not the model itself as it is now (``rpo_lib.train.reference``).
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
        self.device = self.parallel.device or env.device(config.device)
        self.history = History()
        self.seconds = 0.0
        self.step = 0
        self._setup_model(model, ref_model)
        self._setup_data(rows)
        self.reference = Reference(self.model, config, ref_model=self._place(ref_model) if ref_model is not None
                                   else None, ref_adapter_name=ref_adapter_name, evaluating=evaluate is not None)
        self._setup_optimizer()
        self.online_sample_rows = self._online_rows() if config.method == "hypo" else None
        if config.padding_free:
            check_packing(self, user_ref_model=ref_model is not None)

    # ------------------------------------------------------------------------------------------- set-up
    def _setup_model(self, model: Any, ref_model: Any) -> None:
        """Place the model and turn dropout off (or refuse HyPO with it)."""
        config = self.config
        self.model = self._place(model)
        if config.disable_dropout:
            disable_dropout(self.model)
            if ref_model is not None:
                disable_dropout(ref_model)
        elif config.method == "hypo" and find_dropout(self.model):
            raise ValueError(f"HyPO scores its own samples in train mode, so with dropout on "
                             f"({', '.join(find_dropout(self.model)[:3])} ...) its KL estimate is biased: keep "
                             f"disable_dropout=True.")
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else self.tokenizer.eos_token_id)
        # A 4-bit or bf16 base with float32 adapters computes under autocast, as TRL with bf16=True does: without
        # it peft casts each adapted layer's input to float32 and keeps that copy (rpo_lib.memory).
        self.compute_dtype = compute_dtype(self.model)

    def _setup_data(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Tokenize and check the rows (``rpo_lib.data``): nothing is dropped or cut silently."""
        config = self.config
        tokenize = tokenize_sft if config.method == "sft" else tokenize_preferences
        self.examples: list[Any]
        self.examples, self.report = tokenize(rows, self.tokenizer, max_length=config.max_length,
                                              max_prompt_length=config.max_prompt_length,
                                              prompt_truncation=config.prompt_truncation,
                                              parse_special_tokens=config.parse_special_tokens)
        report = self.report
        if (report.n_dropped or report.truncated or report.special_text) and self.parallel.is_main:
            log.info(str(report))
        if report.cut_share > config.max_cut_share:
            message = (f"{report.completions_cut} of {report.completions} completions ({report.cut_share:.0%}) are cut "
                       f"to max_length={config.max_length} and lose their end-of-turn token, above max_cut_share="
                       f"{config.max_cut_share:g}: the model would learn replies that never end. Raise max_length "
                       f"(preset('cpu_chat') holds typical chat turns), or filter long rows out.")
            if config.strict:
                raise ValueError(f"strict=True: {message}")
            warnings.warn(f"rpo_lib.train: {message}", UserWarning, stacklevel=3)
        self.data_fingerprint = fingerprint(self.examples)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order), made once per epoch

    def _setup_optimizer(self) -> None:
        """Turn activation checkpointing on, wrap the model for its processes (DDP, or FSDP2 sharding in place) and
        make AdamW over the trainable parameters (FSDP2 replaces them by sharded ones) with its warm-up and
        schedule."""
        config = self.config
        if config.gradient_checkpointing and not _checkpointing_on(self.model):
            enable_checkpointing(self.model)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere): unfreeze "
                             "them, or add a LoRA adapter (rpo_lib.models.with_lora).")
        self.train_model, self.optimizer = self.parallel.prepare(self.model, lambda params: torch.optim.AdamW(
            params, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay))
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: batches.lr_factor(s, self.config))
        self._autocast = self.compute_dtype in (torch.bfloat16, torch.float16) and any(
            p.dtype == torch.float32 for p in self.parameters)

    def _place(self, model: Any) -> Any:
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if not quantized and getattr(model, "hf_device_map", None) is None:
            model = model.to(self.device)
        else:
            self.device = next(model.parameters()).device
        if quantized and self.device.type == "cpu":
            keep_4bit_trainable_on_cpu(model)  # bitsandbytes' CPU inference packing has no backward
        return model

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

    @property
    def ref_model(self) -> Any:
        """The separate model that computes ``pi_ref`` (yours, or a frozen copy); None when there is none."""
        return self.reference.model

    @property
    def ref_adapter_name(self) -> str | None:
        """The PEFT adapter that is ``pi_ref``; None when it is not an adapter."""
        return self.reference.adapter_name

    # ------------------------------------------------------------------------------------------ scoring
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

    def reference_model(self) -> contextlib.AbstractContextManager[Any]:
        """``with trainer.reference_model() as ref:`` a model that computes ``pi_ref``: ``ref_model``, the PEFT model
        with its reference adapter active or its adapter disabled, or (before the first step) the model itself."""
        return self.reference.use(trained=self.step > 0)

    def _precompute(self) -> None:
        """Reference log-probs of every pair, (N, 2) chosen/rejected, computed once without gradients."""
        config = self.config
        if self.reference.logps is not None or config.method == "sft" or not config.precompute_ref_logps:
            return
        size = config.precompute_ref_batch_size or 4 * config.micro_batch
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
        self.reference.logps = torch.cat([gathered[r * block:min(n, (r + 1) * block)] for r in range(ranks)])

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
        """Example indices of optimizer step ``step`` (``rpo_lib.train.batches``; the epoch's order is made once)."""
        epoch = batches.step_epoch(step, len(self.examples), self.config)
        if self._order is None or self._order[0] != epoch:
            lengths = [batches.example_length(e) for e in self.examples] if self.config.group_by_length else \
                [0] * len(self.examples)
            self._order = (epoch, batches.epoch_order(epoch, lengths, self.config))
        return batches.step_indices(step, self._order[1], self.config)

    def _epoch(self, step: int) -> float:
        """Epochs completed after optimizer step ``step`` (0-based)."""
        return batches.epochs_done(step, len(self.examples), self.config)

    def _token_count(self, indices: Sequence[int]) -> float:
        return float(sum(batches.completion_tokens(self.examples[i]) for i in indices))

    def _loss_terms(self, indices: list[int], share: float, token_count: float, samples: Samples | None = None
                    ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """One micro-batch's loss terms, weighted by its ``share`` of the batch: ``STEPS[config.method]``
        (``rpo_lib.train.steps``, where each method's step is written out)."""
        return STEPS[self.config.method](self, indices, share, token_count, samples)

    def batch_loss(self, indices: Sequence[int] | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss (with gradients) and metrics of ``self.examples[indices]`` (default: all) as one batch,
        under the current model, without an update: for checks against other implementations. HyPO draws
        online samples for these prompts with the seeds of the current step (``_online_samples``)."""
        indices = list(range(len(self.examples))) if indices is None else list(indices)
        samples = self._online_samples(indices, self.step) if self.config.method == "hypo" else None
        terms = list(self._loss_terms(indices, 1.0, self._token_count(indices), samples))
        loss = torch.stack([term for term, _ in terms]).sum()
        metrics = {key: value for _, values in terms for key, value in values.items()}
        return loss, losses._as_floats(metrics)

    def _optimizer_step(self, step: int) -> dict[str, float]:
        config = self.config
        batch = self._batch_indices(step)  # the global batch: the same on every process
        token_count = self._token_count(batch)  # global: RPO, SFT
        # This process's shard; stand-ins (weight 0) keep every process's number of passes the same.
        indices, stand_ins = shard(batch, self.parallel.rank, self.parallel.world_size)
        real = len(indices) - stand_ins
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        with deferred_checks() as checks:
            # HyPO: the whole step's samples first, before any activation is alive (rpo_lib.sample sizes the loops).
            samples = self._online_samples(indices, step) if config.method == "hypo" else None
            chunks = micro_batches(real, len(indices), config.micro_batch)  # a stand-in pass where a shard is short
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
            metrics_read = read_back({**totals, "grad_norm": grad_norm}, checks)  # the step's one read-back
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
        run_log = self._run_log()
        if self.step == 0 and self.evaluate is not None and not self.history:
            self.history.append({"step": 0, **self._evaluate()})
            if run_log is not None:
                run_log.write(self.history[-1])
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
                if run_log is not None:
                    run_log.write(row)
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
                log.warning(f"interrupted during step {self.step + 1}. {hint}")
            raise
        finally:
            if run_log is not None:
                run_log.close()
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
        return RunLog(directory, config.report_to, settings(config))  # as a checkpoint records them

    def _claim_checkpoint_dir(self, overwrite: bool) -> None:
        """A new run may write into ``checkpoint_dir`` only if it holds no checkpoints, or if told to delete them."""
        directory = self.config.checkpoint_dir
        if not directory or not checkpoints.checkpoint_files(directory):
            return
        if overwrite:
            self.parallel.barrier()  # every process has looked before the first one deletes
            if self.parallel.is_main:
                removed = checkpoints.remove_checkpoints(directory)
                log.info(f"deleted {len(removed)} checkpoint file(s) of an earlier run in {directory}.")
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
        return resume.run_description(self.config, self.data_fingerprint, self.model)

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
            "rng": resume.rng_state(),
            "run": self._run_description(),
            "ref_logps": self.reference.logps,
        }
        path = Path(path)
        if self.parallel.is_main:
            checkpoints.write_atomic(state, path)
            if self.config.checkpoint_dir and path.parent.resolve() == Path(self.config.checkpoint_dir).resolve():
                checkpoints.rotate(path.parent, self.config.keep_checkpoints)
        self.parallel.barrier()  # nobody goes on (or reads it) before it is written
        return path

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
                log.warning(f"skipping {error.path.name}: {error.problem} Resuming from {path.name}, the newest "
                            f"intact checkpoint, instead.")
        else:
            path = Path(where)  # type: ignore[arg-type]
            state = checkpoints.read(path)
        differences = resume.differences(state["run"], self._run_description(), self.config)
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
            log.info(f"the checkpoint's run had max_steps={saved_steps}; this one has {self.config.max_steps}, and "
                     f"its learning-rate schedule follows the new length.")
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
        resume.set_rng_state(state["rng"])
        self.reference.logps = state["ref_logps"]
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

