"""The reference policy ``pi_ref`` of a run, as one object: which model computes it, and its precomputed table.

``pi_ref`` is, in this order:

1. the ``ref_model`` you pass (kept frozen in eval mode, used without gradients);
2. for a PEFT model with a frozen reference adapter (``ref_adapter_name``, or the adapter named ``"reference"``
   that ``rpo_lib.models.load_policy(sft_adapter=...)`` adds): the model with that adapter active;
3. for any other PEFT model: the same model with its adapters disabled (no second copy in memory);
4. otherwise a frozen copy of the model as it is when the trainer is made; no copy at all when nothing needs
   one after training starts (full fine-tuning with ``precompute_ref_logps`` and without HyPO or an
   evaluator): before the first step the policy itself is ``pi_ref``.

``precompute_ref_logps=True`` scores every pair under ``pi_ref`` once, before training; ``Reference.logps`` then
holds the (N, 2) chosen/rejected table and the steps read it instead of running the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from rpo_lib.models import REF_ADAPTER, as_reference, frozen_copy, is_peft
from rpo_lib.train.config import TrainConfig

__all__ = ["Reference"]


class Reference:
    """``pi_ref`` for ``policy``: see the module docstring for which model computes it.

    Args:
        policy: the model being trained (a PEFT model or a plain causal LM).
        config: the run's config (whether the reference must outlive the first step).
        ref_model: a separate reference model, already on its device; None: derived from ``policy``.
        ref_adapter_name: the PEFT adapter that is ``pi_ref``; None: ``"reference"`` if the model has one.
        evaluating: whether an evaluator will run (it may score against ``pi_ref`` after training starts).
    """

    def __init__(self, policy: Any, config: TrainConfig, *, ref_model: Any = None,
                 ref_adapter_name: str | None = None, evaluating: bool = False) -> None:
        self.policy = policy
        self.adapter_name = self._adapter(policy, ref_adapter_name)
        self.logps: Tensor | None = None  # (N, 2) chosen/rejected under pi_ref, once precomputed
        self.model: Any
        if ref_model is not None:  # used under torch.no_grad; its requires_grad flags are left as they are
            self.model, self.kind = ref_model.eval(), "ref_model"
        elif is_peft(policy):
            self.model = None
            self.kind = f"adapter {self.adapter_name!r}" if self.adapter_name else "the base (adapters disabled)"
        elif config.method == "hypo" or evaluating or (config.method != "sft" and not config.precompute_ref_logps):
            self.model, self.kind = frozen_copy(policy), "a frozen copy"
        else:
            self.model, self.kind = None, "the policy before its first step"

    @staticmethod
    def _adapter(policy: Any, name: str | None) -> str | None:
        adapters = set(getattr(policy, "peft_config", None) or {})
        if name is None:
            return REF_ADAPTER if REF_ADAPTER in adapters and is_peft(policy) else None
        if name not in adapters:
            raise ValueError(f"ref_adapter_name={name!r}, but the model's adapters are {sorted(adapters) or 'none'}: "
                             f"load the SFT adapter under that name (rpo_lib.models.load_policy(sft_adapter=...)).")
        return name

    @contextlib.contextmanager
    def use(self, *, trained: bool) -> Iterator[Any]:
        """``with reference.use(trained=step > 0) as model:`` a model that computes ``pi_ref``; ``trained``: the
        policy has taken a step, so it is no longer ``pi_ref`` itself."""
        if self.model is None and self.adapter_name is None and not is_peft(self.policy):
            if trained:
                raise ValueError("this trainer keeps no reference model (precompute_ref_logps without HyPO or an "
                                 "evaluator): pass ref_model=... to score against pi_ref after training.")
            yield self.policy  # before the first step the policy is pi_ref
            return
        with as_reference(self.policy, ref_model=self.model, ref_adapter_name=self.adapter_name) as model:
            yield model

    def precomputed(self, indices: list[int]) -> tuple[Tensor, Tensor] | None:
        """(chosen, rejected) log-probs of the pairs ``indices`` from the precomputed table; None without one."""
        if self.logps is None:
            return None
        table = self.logps[indices]
        return table[:, 0], table[:, 1]

    def __repr__(self) -> str:
        table = f", precomputed {tuple(self.logps.shape)}" if self.logps is not None else ""
        return f"Reference({self.kind}{table})"
