"""The order of the data and the pace of learning, as pure functions of (config, step): which examples each
optimizer step takes, how many epochs that is, and the learning-rate factor.

Every epoch is a fresh seeded permutation of the examples, cut into ``batch_size`` pieces; the last piece of an
epoch is smaller when ``batch_size`` does not divide the data (as a PyTorch ``DataLoader`` with
``drop_last=False``), so no batch holds an example twice. ``group_by_length`` reorders each epoch so that a
batch holds examples of similar length, and the order of the batches stays random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from rpo_lib.data import SFTExample
from rpo_lib.train.config import TrainConfig

__all__ = ["completion_tokens", "epoch_order", "epochs_done", "example_length", "group_by_length", "lr_factor",
           "step_epoch", "step_indices",
           "steps_per_epoch"]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up from 0 over
    ``warmup_steps``, then ``lr_schedule`` (constant, linear to 0, or cosine to 0 at ``max_steps``)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def example_length(example: Any) -> int:
    """Tokens of an example's longest row (prompt + its longest completion)."""
    if isinstance(example, SFTExample):
        return len(example.prompt_ids) + len(example.completion_ids)
    return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))


def completion_tokens(example: Any) -> int:
    """Tokens the token-mean SFT term counts for an example: its chosen (or SFT) completion."""
    return len(example.completion_ids if isinstance(example, SFTExample) else example.chosen_ids)


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator,
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


def epoch_order(epoch: int, lengths: Sequence[int], config: TrainConfig) -> list[int]:
    """The order of the ``len(lengths)`` examples in ``epoch``: a permutation seeded by (seed, epoch), grouped by
    length when ``config.group_by_length``."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if config.group_by_length:
        order = group_by_length(order, lengths, config.batch_size, generator)
    return order


def steps_per_epoch(n: int, config: TrainConfig) -> int:
    """Optimizer steps in one epoch of ``n`` examples (the last batch smaller when ``batch_size`` does not divide)."""
    return math.ceil(n / config.batch_size)


def step_indices(step: int, order: Sequence[int], config: TrainConfig) -> list[int]:
    """The examples of optimizer step ``step`` (0-based), given its epoch's ``order``: a batch never spans two
    epochs (the last one of an epoch is smaller when ``batch_size`` does not divide the data)."""
    n, size = len(order), config.batch_size
    position = step % steps_per_epoch(n, config)
    return list(order[position * size:min(n, (position + 1) * size)])


def step_epoch(step: int, n: int, config: TrainConfig) -> int:
    """The epoch that optimizer step ``step`` (0-based) belongs to, with ``n`` examples."""
    return step // steps_per_epoch(n, config)


def epochs_done(step: int, n: int, config: TrainConfig) -> float:
    """Epochs completed after optimizer step ``step`` (0-based), with ``n`` examples."""
    epoch, position = divmod(step, steps_per_epoch(n, config))
    return epoch + min(n, (position + 1) * config.batch_size) / n
