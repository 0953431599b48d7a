"""What one training process does differently when a run has many: its shard, the reductions, the wrapping.

``rpo_lib.train.Trainer`` has one loop. It asks a ``Parallel`` object, never ``torch.distributed`` itself, for
everything that depends on the number of processes; ``SingleProcess`` (the default) answers for one process,
``Distributed`` for a process of a run started by ``rpo_lib.launch`` (accelerate underneath). What a step does
on N processes (``notebooks/09_multi_gpu.ipynb`` draws it):

1. Every process computes the same global batch of indices (the same seeded permutation) and takes a disjoint
   shard of it, every N-th index from its rank (``shard``). A shard that is one short is topped up with a
   stand-in example whose loss is multiplied by 0, so that every process runs the same number of forward and
   backward passes: a sharded model's passes are collective operations, and a process that runs one pass
   fewer would leave the others waiting.
2. Each micro-batch's loss is weighted by its share of the *global* batch, and RPO's token-mean SFT term is
   divided by the *global* batch's chosen-token count (every process knows every example's length, so that
   needs no communication). The N processes' losses then add up to the one-process loss of the whole batch.
3. The engines (DDP, FSDP) *average* the gradients over processes; ``backward`` multiplies the loss by N
   first, so the average of the N processes' gradients is the gradient of that sum: the one-process gradient.
4. The step's metrics (loss, rewards, margins, KL terms: each already weighted by its global share) are summed
   over processes in one all-reduce, so every process logs the same numbers, those of the whole batch.
5. The reference log-probs are computed per process for its own shard (or precomputed: each process scores a
   disjoint block of the data and the blocks are gathered, so every process and the checkpoint hold the whole
   table). HyPO's online samples are drawn per process, for its own prompts, each row with its own seed made
   from (run seed, step, example, sample number): another process count draws the same samples.

Strategies: ``"ddp"`` (accelerate's ``prepare``: ``DistributedDataParallel``, every process holds the whole
model) and ``"fsdp"`` (PyTorch's FSDP2, ``fully_shard`` on every decoder layer and the root: parameters,
gradients and optimizer state are split across processes; 4-bit weights are sharded when their storage dtype
is a float one, as ``rpo_lib.models.load_policy`` sets under FSDP, and kept whole otherwise). accelerate turns
FSDP off on a CPU, and ``fully_shard`` itself works there with gloo, so FSDP2 is applied here directly; the
same code runs on GPUs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rpo_lib.models import base_model

__all__ = ["STRATEGIES", "Distributed", "SingleProcess", "Strategy", "check_strategy", "fully_shard_model",
           "micro_batches", "shard"]

Strategy = Literal["ddp", "fsdp", "deepspeed"]
STRATEGIES = ("ddp", "fsdp", "deepspeed")


def check_strategy(strategy: str) -> None:
    """Raise, saying what to use instead, unless ``strategy`` is one this module runs."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}; got {strategy!r}.")
    if strategy == "deepspeed":
        raise NotImplementedError(
            "strategy='deepspeed' is not supported yet: DeepSpeed's engine runs its own gradient accumulation and "
            "optimizer step, which would be a second training loop. Use strategy='fsdp' (FSDP2 shards parameters, "
            "gradients and optimizer state, as ZeRO-3 does) or 'ddp'.")


def shard(indices: Sequence[int], rank: int, world_size: int) -> tuple[list[int], int]:
    """``(mine, stand_ins)``: every ``world_size``-th index from ``rank``, topped up to the longest shard's length
    with copies of ``indices[0]`` (``stand_ins`` of them, at the end), whose losses count 0."""
    mine = list(indices[rank::world_size])
    longest = math.ceil(len(indices) / world_size)
    stand_ins = longest - len(mine)
    return mine + [indices[0]] * stand_ins, stand_ins


def micro_batches(real: int, padded: int, size: int) -> list[tuple[int, int, float]]:
    """``(start, stop, weight)`` of each micro-batch of a shard: its ``real`` examples in pieces of ``size``, then, if
    the longest shard (``padded``, stand-ins included) needs one more pass, one stand-in piece of weight 0."""
    pieces = [(start, min(start + size, real), 1.0) for start in range(0, real, size)]
    return pieces + [(real, real + 1, 0.0)] * (math.ceil(padded / size) - len(pieces))


class SingleProcess:
    """One process: nothing to shard, reduce or wrap. The default of ``rpo_lib.train.Trainer``."""

    rank = 0
    world_size = 1
    strategy: str = "single"
    device: torch.device | None = None  # None: the trainer picks (config.device, else CUDA, MPS, CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: Any, optimizer_factory: Any) -> tuple[Any, Any]:
        """``(module to call for gradient passes, optimizer)``: here the model itself and a new optimizer."""
        return model, optimizer_factory([p for p in model.parameters() if p.requires_grad])

    @contextlib.contextmanager
    def gradient_sync(self, model: Any, sync: bool) -> Iterator[None]:
        """Backward passes inside reduce gradients across processes only where ``sync`` is True."""
        yield

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def sum(self, values: Tensor) -> Tensor:
        """The sum over processes of a tensor of the same shape on every process."""
        return values

    def minimum(self, value: int) -> int:
        return value

    def maximum(self, value: float) -> float:
        """The largest of every process's ``value``."""
        return value

    def gather(self, rows: Tensor) -> Tensor:
        """Every process's ``rows`` (same shape everywhere), concatenated in rank order."""
        return rows

    def all_finished(self, flags: Tensor) -> bool:
        return bool(flags.all())

    def barrier(self) -> None:
        pass

    def full(self, tensor: Tensor) -> Tensor:
        """The whole tensor of a parameter (or its optimizer state) that may be sharded."""
        return tensor

    def local(self, full: Tensor, like: Tensor) -> Tensor:
        """This process's part of ``full``, laid out like ``like`` (a parameter or its optimizer state)."""
        return full

    def main_copy(self, tensor: Tensor) -> Tensor | None:
        """For writing a checkpoint: the whole tensor, copied to the CPU, in the first process; None in the others.
        Every process must call it (a sharded tensor is gathered)."""
        return self.full(tensor.detach()).cpu().clone()

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float | None) -> Tensor:
        """The global gradient norm (clipped to ``max_norm`` when given)."""
        return torch.nn.utils.clip_grad_norm_(parameters, math.inf if max_norm is None else max_norm)

    def finish(self) -> None:
        """End of the run (the process group is left as it is)."""


class Distributed(SingleProcess):
    """A process of a multi-process run, set up by ``accelerate``: rank, device and process group from it.

    Args:
        accelerator: an ``accelerate.Accelerator`` (``Accelerator(cpu=True)`` on a CPU); ``rpo_lib.launch``
            makes it.
        strategy: ``"ddp"``, ``"fsdp"`` or ``"deepspeed"`` (see the module docstring).
    """

    def __init__(self, accelerator: Any, strategy: Strategy = "ddp") -> None:
        check_strategy(strategy)
        self.accelerator = accelerator
        self.strategy = strategy
        self.rank = int(accelerator.process_index)
        self.world_size = int(accelerator.num_processes)
        self.device = torch.device(accelerator.device)

    # ---------------------------------------------------------------------------------------- wrapping
    def prepare(self, model: Any, optimizer_factory: Any) -> tuple[Any, Any]:
        if self.world_size == 1:
            return super().prepare(model, optimizer_factory)
        if self.strategy == "fsdp":  # in place: the model itself runs the passes, over sharded parameters
            return super().prepare(fully_shard_model(model), optimizer_factory)
        _, optimizer = super().prepare(model, optimizer_factory)
        return self.accelerator.prepare_model(model), optimizer  # DistributedDataParallel wraps the model

    @contextlib.contextmanager
    def gradient_sync(self, model: Any, sync: bool) -> Iterator[None]:
        if self.world_size == 1 or sync:
            yield
        elif self.strategy == "fsdp":
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with model.no_sync():
                yield

    def backward(self, loss: Tensor) -> None:
        # DDP and FSDP average gradients over processes; the losses are shares of the global batch (a sum).
        (loss * self.world_size).backward()

    # ----------------------------------------------------------------------------------- communication
    def sum(self, values: Tensor) -> Tensor:
        if self.world_size == 1:
            return values
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values

    def minimum(self, value: int) -> int:
        return int(self._reduce_number(value, torch.long, torch.distributed.ReduceOp.MIN))

    def maximum(self, value: float) -> float:
        return float(self._reduce_number(value, torch.float64, torch.distributed.ReduceOp.MAX))

    def _reduce_number(self, value: float, dtype: torch.dtype, op: Any) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=dtype, device=self._comm_device)
        torch.distributed.all_reduce(tensor, op=op)
        return tensor.item()

    def gather(self, rows: Tensor) -> Tensor:
        if self.world_size == 1:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def all_finished(self, flags: Tensor) -> bool:
        if self.world_size == 1 or self.strategy != "fsdp":
            return bool(flags.all())  # only a sharded model's passes are collective
        done = flags.all().to(torch.long).reshape(1)
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        return bool(done.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @property
    def _comm_device(self) -> torch.device:
        """Where small tensors for a collective live: the GPU under NCCL, the CPU under gloo."""
        return torch.device(self.accelerator.device) if torch.distributed.get_backend() == "nccl" else \
            torch.device("cpu")

    # ------------------------------------------------------------------------------------ sharded state
    def full(self, tensor: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    def local(self, full: Tensor, like: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(like, DTensor):
            return full
        # Every process holds the whole tensor (all read the checkpoint): each keeps its own part, no traffic.
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)

    def main_copy(self, tensor: Tensor) -> Tensor | None:
        # One tensor at a time is gathered on every device (a collective), but only the first process copies it to
        # host memory: a full fine-tuning checkpoint of a 7B model is held once per machine, not once per GPU.
        whole = self.full(tensor.detach())
        return whole.cpu().clone() if self.is_main else None

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float | None) -> Tensor:
        return self.full(super().clip_grad_norm(parameters, max_norm))  # FSDP's norm is a DTensor

    def finish(self) -> None:
        self.accelerator.end_training()


def _decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes), outermost first."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"FSDP needs the model's repeated blocks: {type(base).__name__} names none in "
                         f"_no_split_modules; use strategy='ddp'.")
    return layers


def fully_shard_model(model: Any) -> Any:
    """FSDP2 on ``model`` in place: every decoder layer its own unit, the rest in the root's.

    Frozen quantised weights that cannot be cut into DTensors without losing their quantisation state stay whole
    on every process (``ignored_params``), as accelerate does: 4-bit weights whose storage is an integer dtype
    (load the model with a float storage dtype, as ``load_policy`` does under FSDP, to shard them too) and 8-bit
    weights (LLM.int8() keeps its scales in the parameter's ``CB``/``SCB`` attributes, which a shard would lose).
    """
    from torch.distributed.fsdp import fully_shard

    ignored = {p for p in model.parameters() if not p.requires_grad and (
        (type(p).__name__ == "Params4bit" and not p.is_floating_point()) or type(p).__name__ == "Int8Params")}
    options: dict[str, Any] = {"ignored_params": ignored} if ignored else {}
    for layer in _decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model
