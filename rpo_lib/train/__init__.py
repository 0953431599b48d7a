"""One trainer for SFT, DPO, IPO, RPO and HyPO on any Hugging Face causal LM (full fine-tuning or LoRA).

::

    from rpo_lib.train import Trainer, preset
    config = preset("tiny", method="rpo", sft_weight=1.0, max_steps=300)
    trainer = Trainer(model, tokenizer, rows, config)        # rows: {"prompt", "chosen", "rejected"}, or chats
    history = trainer.train()                                # resume later with trainer.train(resume=True)
    steps, margins = history.series("rewards/margins")

The package, one job per module (each imports only those above it):

- ``config``: ``TrainConfig``, the typed rule of every field, ``PRESETS`` and ``preset``.
- ``batches``: which examples each step takes (a seeded permutation per epoch, optionally grouped by length),
  epochs done, and the learning-rate schedule: pure functions of (config, step).
- ``reference``: the reference policy ``pi_ref`` as one object (your ``ref_model``, a reference adapter, the
  base with adapters disabled, a frozen copy, or the precomputed table of the pairs' log-probs).
- ``steps``: one step function per method in the table ``STEPS`` (``STEPS["hypo"]`` is HyPO's step); they feed
  ``rpo_lib.losses``' pure loss functions.
- ``packed_check``: ``padding_free`` refuses a model whose packed rows it cannot score exactly.
- ``resume``: what a checkpoint must match to be resumed (settings, data fingerprint, trainable shapes; RNGs).
- ``trainer``: ``Trainer`` (set-up, the one loop, checkpoints) and ``History``.

The losses are ``rpo_lib.losses``' pure functions; the trainer feeds them: it tokenizes and checks the rows
(``rpo_lib.data``; dropped rows are reported), computes log-probabilities (``rpo_lib.logprobs``), gets the
reference's log-probabilities, draws HyPO's online samples (``rpo_lib.sample``), accumulates gradients over
micro-batches, steps AdamW with warm-up and a schedule, logs (``rpo_lib.log``), evaluates and checkpoints
(``rpo_lib.checkpoints``).

Log-probabilities. ``log pi(y|x)`` is the sum over the completion's tokens for DPO, RPO and HyPO (the exact
log-probability, as the papers and TRL use it) and the mean for IPO (the IPO authors' form and TRL's
``loss_type="ipo"``); ``logp_reduction`` overrides it for the offline pairs. HyPO's online KL always uses
sums: it estimates ``KL(pi || pi_ref)`` of whole responses.

Dropout is turned off in the policy and the reference (``disable_dropout=True``, ``rpo_lib.models``), as TRL
does, so that a policy equal to ``pi_ref`` gives zero margins and a zero online KL.

The reference policy ``pi_ref`` is, in this order: the ``ref_model`` you pass; for a PEFT model, the same
model with its reference adapter, or with its adapter disabled (no second copy in memory); otherwise a frozen
copy of the model as it is when the trainer is made. ``precompute_ref_logps=True`` scores the pairs once under
``pi_ref`` before training (``precompute_ref_batch_size`` pairs per pass); for full fine-tuning without HyPO or
an evaluator this also avoids the copy.

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

from rpo_lib.checkpoints import latest_checkpoint
from rpo_lib.train.config import METHODS, PRESETS, RESUME_FREE, Method, TrainConfig, preset
from rpo_lib.train.packed_check import PACKING_CHECK_EXAMPLES, PACKING_TOLERANCE
from rpo_lib.train.reference import Reference
from rpo_lib.train.steps import STEPS
from rpo_lib.train.trainer import History, Trainer

__all__ = ["METHODS", "PACKING_CHECK_EXAMPLES", "PACKING_TOLERANCE", "PRESETS", "RESUME_FREE", "STEPS", "History",
           "Method", "Reference", "TrainConfig", "Trainer", "latest_checkpoint", "preset"]
