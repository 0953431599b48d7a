"""``padding_free=True``: refuse, before any step, a model whose packed rows are not scored as its padded rows are.

First what is known in advance (``rpo_lib.packing.unsupported``: families whose mask ignores the positions,
ALiBi, layer kinds it cannot mask, sliding windows read from the config), then a measurement: the
``PACKING_CHECK_EXAMPLES`` shortest examples scored without gradients, each alone in a padded pass and all
together in packed rows (so several sequences share a row). No pass holds more logits than a padded training
step of the shortest pair would. The largest difference of a sequence's log-prob, per completion token, must
stay within ``PACKING_TOLERANCE`` of the compute dtype: a family that leaks attention across packed sequences or
transforms its logits in a way packing misses differs by far more (tests/test_families.py). Windows longer than
these short examples do not show here: the rules cover them. Every process runs the same passes and takes the
largest difference of all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rpo_lib import packing
from rpo_lib.models import base_model
from rpo_lib.train.batches import example_length

if TYPE_CHECKING:
    from rpo_lib.train.trainer import Trainer

__all__ = ["PACKING_CHECK_EXAMPLES", "PACKING_TOLERANCE", "check_packing"]

# How many examples are scored both ways (2: four sequences packed, so some share a row; padded one pair at a
# time, the shortest: a small pass), and the largest difference per completion token (nats) accepted, by
# compute dtype. Measured on CPU in float32: at most 2e-6 on every family that is exact (tests/test_families.py);
# a leak across sequences or a dropped window costs 1e-2 to 1 and more. In 16-bit dtypes the two paths round
# differently; their agreement on a GPU is what benchmarks/gpu_check.sh measures, and the bound below only
# catches gross errors there (OPT's and Falcon's are refused by rule).
PACKING_CHECK_EXAMPLES = 2
PACKING_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def model_name(model: Any) -> str:
    return type(base_model(model)).__name__


def check_packing(trainer: Trainer, *, user_ref_model: bool) -> None:
    """Raise ``ValueError`` (saying what to do) unless the trainer's model, and the ``ref_model`` the user passed,
    score packed rows as they score padded rows; see the module docstring."""
    config = trainer.config
    models = [("the model", trainer.model)] + ([("ref_model", trainer.ref_model)] if user_ref_model else [])
    for what, model in models:
        problem = packing.unsupported(model, config.packing_attention)
        if problem is not None:
            raise ValueError(f"padding_free=True: {what} ({model_name(model)}) cannot be scored exactly in packed rows "
                             f"with packing_attention={config.packing_attention!r}: {problem}. Use "
                             f"padding_free=False (padded batches are exact on every model).")
    shortest = sorted(range(len(trainer.examples)), key=lambda i: (example_length(trainer.examples[i]), i))
    examples = [trainer.examples[i] for i in shortest[:PACKING_CHECK_EXAMPLES]]
    tolerance = PACKING_TOLERANCE.get(trainer.compute_dtype, PACKING_TOLERANCE[torch.float32])
    other = "varlen" if config.packing_attention == "mask" else "mask"
    for what, model in models:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                alone = [trainer._forward(model, trainer._to_device(trainer.collate([e], padded=True)), "sum")
                         for e in examples]
                packed = trainer._forward(model, trainer._to_device(trainer.collate(examples)), "sum")
        except Exception as error:  # a family whose forward refuses packed inputs
            raise ValueError(f"padding_free=True: {what} ({model_name(model)}) failed to score packed rows with "
                             f"packing_attention={config.packing_attention!r} ({type(error).__name__}: {error}). "
                             f"Use padding_free=False.") from error
        finally:
            model.train(was_training)
        # collate's order: every example's chosen rows first, then the rejected ones (or one row per SFT example)
        rows = len(alone[0][0])
        padded = torch.cat([torch.cat([out[0][k::rows] for out in alone]) for k in range(rows)])
        tokens = torch.cat([torch.cat([out[2].sum(dim=1)[k::rows] for out in alone]) for k in range(rows)])
        per_token = float(((packed[0] - padded).abs() / tokens.clamp(min=1)).max())
        worst = trainer.parallel.maximum(per_token)
        if not worst <= tolerance:
            raise ValueError(
                f"padding_free=True: {what} ({model_name(model)}) scores packed rows differently from padded rows "
                f"with packing_attention={config.packing_attention!r}: up to {worst:.3g} nats per token on the "
                f"{len(examples)} shortest examples (tolerance {tolerance:g} in {trainer.compute_dtype}). Training "
                f"would use wrong log-probabilities. Use padding_free=False (exact on every model), or try "
                f"packing_attention={other!r}.")
