"""Plan a training step's peak GPU memory before loading anything: will QLoRA RPO on this model fit my GPU?

::

    from rpo_lib.memory import SHAPES, plan_memory
    plan = plan_memory(SHAPES["mistral-7b"], max_length=1024, pairs=2)   # or a transformers config
    print(plan)                      # the parts, the total, and which of 16/24/40/80 GB GPUs it fits
    plan.advice(16)                  # the settings that would make it fit a 16 GB GPU

The peak of one optimizer micro-step is the sum of

- **weights**: linear layers in NF4 (4 bits + one 8-bit scale per 64 weights + one float32 scale per 256
  scales, with double quantisation), in int8, or in the compute dtype; embeddings, norms and the output head in
  the compute dtype (``rpo_lib.models.prepare_for_kbit_training`` does not upcast them; ``upcast_frozen=True``
  counts peft's float32 copies, as TRL makes them);
- **trainable state**: LoRA weights in float32 with their gradients and AdamW's two moments (16 bytes each);
  for full fine-tuning every weight in its master dtype (float32: ``rpo_lib.models.load_policy`` keeps float32
  master weights and computes in bf16), its gradient and two AdamW moments in the same dtype: 16 bytes per
  parameter in all (``master_bytes=2``: 8, and most small updates lost);
- **the reference copy** (full fine-tuning, unless the reference log-probs are precomputed and nothing else needs
  the reference): the trainer's frozen copy, its linear layers (an untied output head too) in the compute dtype
  and the embeddings and norms as the master weights (``rpo_lib.models.frozen_copy``), whole on every GPU (it is
  not sharded);
- **activations**: what autograd keeps for the backward pass (below), for every layer without checkpointing,
  or each layer's input plus one recomputed layer with it;
- **logits**: a full (T, V) block in bfloat16, its float32 copy and float32 log-softmax (what a padded DPO
  loss builds, ``logits="full"``), or ``rpo_lib.logprobs``' way (``"chunked"``): the model's logits in the
  compute dtype at the positions that are scored (every position of a padded batch; only the completion tokens of
  a packed one, ``completion_tokens``), and float32 chunks of them;
- **reference pass**: one layer's working set and its logits (nothing if the reference log-probs are
  precomputed);
- **HyPO**: the KV cache of the online samples and the activations of scoring them.

On several GPUs (``num_gpus``, ``strategy``; ``rpo_lib.launch``) the plan is per GPU. DDP keeps everything
above on every GPU and adds its gradient buckets (a copy of the trainable gradients). FSDP divides the decoder
layers' weights (except 8-bit ones, kept whole) and the trainable state by the number of GPUs, keeps the root unit
(embeddings, head, final norm) whole through the step, and adds the layers it has gathered whole: the one running
and the next, prefetched. Activations, logits and the HyPO parts are per micro-batch, the same on 1 GPU or 8.

The weights, the trainable state and the reference copy stay, and their size is known to the byte; the other parts
live in phases of the step that never overlap (the reference pass, the policy's forward and backward, HyPO's
sampling, HyPO's scoring), so the peak counts the largest. ``ALLOCATOR_SLACK`` is added to that phase only: what
varies from step to step (activations, logits, the allocator's fragmentation and workspaces), not the weights.

Activations per token and layer of a Llama/Mistral decoder with LoRA on every linear layer, bfloat16 autocast::

    24 H + 8 I + 4 (kv heads x head dim) + 4 heads + 8 + 2 r x (adapted linears)  bytes  (activation_bytes_per_token)

(H hidden size, I MLP width, r LoRA rank). The formula was measured, not guessed: autograd's saved tensors
(``saved_activation_bytes``, storages deduplicated, parameters excluded) on five model shapes, where it holds to
the byte; ``tests/test_memory.py`` re-measures a sixth. Without autocast peft casts every adapted layer's input
to float32 and the count is ``36 H + 10 I + ... + 4 r``: ``rpo_lib.train`` runs its forward passes under
autocast for that reason. What the CPU cannot show is the GPU allocator's own overhead: the planner adds
``ALLOCATOR_SLACK`` and is to be checked against ``torch.cuda.max_memory_allocated`` on a GPU
(``benchmarks/qlora_rpo_7b.py`` prints both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["ALLOCATOR_SLACK", "GPU_SIZES_GB", "MemoryPlan", "ModelShape", "SHAPES",
           "plan_memory", "replace", "saved_activation_bytes", "shape_summary"]

GiB = 2**30
GPU_SIZES_GB = (16, 24, 40, 80)  # nominal sizes: T4 / V100-16; A10 / L4 / RTX 4090; A100-40; A100-80 / H100
CUDA_CONTEXT_GIB = 0.75  # the CUDA context and kernels, outside torch's allocator, subtracted from a GPU's size
ALLOCATOR_SLACK = 0.10  # fragmentation and transient workspaces: a margin on the per-step phase (not the weights)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # per weight: 4 bits, an 8-bit scale per 64, a float32 scale per 256
INT8_BYTES = 1.0  # per weight, plus a float32 scale per output row (counted separately)
CHUNK_BYTES = 3 * 4 * (1 << 22)  # rpo_lib.logprobs: a chunk of 4M float32 logits, its softmax and gradient


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder (Llama, Mistral, Qwen2, ...): what memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (``AutoConfig.from_pretrained(id)``, a model's ``.config``) or a dict."""
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        text = get("text_config")
        if text is not None:
            return cls.from_config(text)
        heads = get("num_attention_heads")
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
                   num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)))

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def linear_parameters(self) -> int:
        """Weights in the decoder layers' linear layers (what quantisation shrinks)."""
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes())

    def other_parameters(self) -> int:
        """Embeddings, output head and norms (kept in the compute dtype)."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return self.vocab_size * self.hidden_size + head + norms

    def parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()

    def lora_parameters(self, r: int) -> int:
        """LoRA weights with rank ``r`` on every linear layer of every decoder layer (A: in x r, B: r x out)."""
        return self.num_hidden_layers * sum(r * (a + b) for a, b in self.linear_shapes())


# Public architecture hyperparameters (the models' config.json files).
SHAPES: dict[str, ModelShape] = {
    "mistral-7b": ModelShape(32000, 4096, 14336, 32, 32, 8, 128),
    "llama-3-8b": ModelShape(128256, 4096, 14336, 32, 32, 8, 128),
    "qwen2.5-0.5b": ModelShape(151936, 896, 4864, 24, 14, 2, 64, tie_word_embeddings=True),
}


def activation_bytes_per_token(shape: ModelShape, *, lora_r: int, autocast: bool = True) -> int:
    """Bytes autograd keeps per token per decoder layer (the formula of the module docstring, measured)."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv, heads = shape.num_key_value_heads * shape.head_dim, shape.num_attention_heads
    if autocast:
        return 24 * h + 8 * i + 4 * kv + 4 * heads + 8 + 2 * lora_r * 7
    return 36 * h + 10 * i + 4 * kv + 4 * heads + 8 + 4 * lora_r * 7


def saved_activation_bytes(model: Any, input_ids: torch.Tensor, *, autocast_dtype: torch.dtype | None = None,
                           **forward_kwargs: Any) -> int:
    """Measure what autograd keeps for the backward pass of one forward of ``model`` (bytes).

    Every tensor saved for backward is counted once per storage; parameters (and quantised weights) are not
    activations and are left out. Runs on any device, so the planner's formula can be checked on a CPU."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in params:
            storages[key] = tensor.untyped_storage().nbytes()
        return tensor

    device_type = input_ids.device.type
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        model(input_ids=input_ids, use_cache=False, **forward_kwargs)
    return sum(storages.values())


Quantization = Literal["nf4", "int8"]
# The parts that live only during one phase of a step, by phase.
_PHASES_BY_STEP = {"reference pass": ("reference pass",), "policy forward and backward": ("activations", "logits"),
                   "HyPO sampling": ("HyPO KV cache",), "HyPO scoring": ("HyPO scoring",)}
_PHASES = {name for names in _PHASES_BY_STEP.values() for name in names}


@dataclass(frozen=True)
class MemoryPlan:
    """The predicted peak of one training micro-step, by part (bytes), and the settings it was made for."""

    parts: dict[str, float]
    settings: dict[str, Any]
    shape: ModelShape

    @property
    def fixed_bytes(self) -> float:
        """What stays through the step: weights, trainable state, a reference copy, DDP's buckets, FSDP's layers."""
        return sum(self.parts[name] for name in self.parts if name not in _PHASES)

    @property
    def phase_bytes(self) -> dict[str, float]:
        """Each phase of the step and what lives in it (the parts that come and go)."""
        return {phase: sum(self.parts.get(name, 0.0) for name in names) for phase, names in _PHASES_BY_STEP.items()}

    @property
    def total_bytes(self) -> float:
        """What stays, plus the largest of the step's phases (they never overlap: the reference pass ends before the
        policy's forward, HyPO's samples are drawn before either and scored after the offline backward) with
        ``ALLOCATOR_SLACK`` on it."""
        return self.fixed_bytes + max(self.phase_bytes.values()) * (1 + ALLOCATOR_SLACK)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def fits(self, gpu_gb: float) -> bool:
        """Whether the peak fits a GPU of ``gpu_gb`` nominal gigabytes (less the CUDA context)."""
        return self.total_gib <= gpu_gb * 1e9 / GiB - CUDA_CONTEXT_GIB

    def advice(self, gpu_gb: float) -> dict[str, Any]:
        """The fewest changes, tried in a fixed order, that make the step fit ``gpu_gb`` ({} if it fits already).

        Order: gradient checkpointing, chunked logits, precomputed reference log-probs, a LoRA adapter instead of
        full fine-tuning, 4-bit weights, one pair per micro-batch (keep the batch with gradient accumulation),
        then halving max_length. Raises if even all of them do not fit."""
        if self.fits(gpu_gb):
            return {}
        steps = [("gradient_checkpointing", True), ("logits", "chunked"), ("precompute_ref", True),
                 ("lora_r", self.settings["lora_r"] or 16), ("quantization", "nf4"), ("pairs", 1)]
        changes: dict[str, Any] = {}
        settings = dict(self.settings)
        for name, value in steps:
            if settings.get(name) == value:
                continue
            changes[name] = value
            settings[name] = value
            if _plan(self.shape, settings).fits(gpu_gb):
                return changes
        while settings["max_length"] > 128:
            settings["max_length"] //= 2
            changes["max_length"] = settings["max_length"]
            if _plan(self.shape, settings).fits(gpu_gb):
                return changes
        raise ValueError(f"no setting fits a {gpu_gb} GB GPU: even the weights and trainable state take "
                         f"{_plan(self.shape, settings).total_gib:.1f} GiB. Use a larger GPU or shard the model "
                         f"over several (rpo_lib.launch).")

    def table(self) -> str:
        """The parts and the total in GiB, and a fit line for each GPU size."""
        width = max(map(len, self.parts))
        lines = [f"{name:<{width}}  {value / GiB:7.2f} GiB" for name, value in self.parts.items()]
        if self.settings.get("num_gpus", 1) > 1:
            lines.insert(0, f"per GPU, {self.settings['num_gpus']} GPUs with {self.settings['strategy'].upper()}:")
        lines.append(f"{'peak':<{width}}  {self.total_gib:7.2f} GiB   (what stays + the largest phase, +"
                     f"{ALLOCATOR_SLACK:.0%} on that phase)")
        for size in GPU_SIZES_GB:
            advice = self.advice(size) if not self.fits(size) else {}
            verdict = "fits" if not advice else "fits with " + ", ".join(f"{k}={v}" for k, v in advice.items())
            lines.append(f"{str(size) + ' GB GPU':<{width}}  {verdict}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan_memory(model: Any, *, max_length: int = 1024, pairs: int = 2, lora_r: int | None = 16,
                quantization: Quantization | None = "nf4", gradient_checkpointing: bool = True,
                logits: Literal["chunked", "full"] = "chunked", precompute_ref: bool = False,
                real_tokens: int | None = None, completion_tokens: int | None = None, method: str = "rpo",
                k_online: int = 2, online_new_tokens: int = 128, prompt_length: int | None = None,
                upcast_frozen: bool = False, autocast: bool = True, dtype_bytes: int = 2, master_bytes: int = 4,
                num_gpus: int = 1, strategy: Literal["ddp", "fsdp"] = "ddp") -> MemoryPlan:
    """Predict the peak memory of one training micro-step (see the module docstring for what is counted).

    Args:
        model: a ``ModelShape``, a key of ``SHAPES``, a transformers config or a model (its ``.config``).
        max_length: tokens per sequence (prompt + completion); ``pairs`` chosen/rejected pairs per micro-batch,
            so ``2 x pairs x max_length`` tokens per forward when padded.
        real_tokens: with padding-free batches, the tokens actually in the micro-batch (default: the padded count).
        completion_tokens: with padding-free batches, the completion tokens among them (only they get logits);
            default: ``real_tokens`` (an upper bound).
        lora_r: LoRA rank on every linear layer; ``None``: full fine-tuning.
        master_bytes: full fine-tuning: bytes of a trained weight (4: float32 master weights, ``load_policy``'s
            default; 2: bf16 weights, ``master_dtype=torch.bfloat16``).
        quantization: ``"nf4"``, ``"int8"`` or ``None`` (weights in the compute dtype, ``dtype_bytes`` each).
        logits: ``"chunked"`` (``rpo_lib``) or ``"full"`` (a (T, V) block, as TRL computes it).
        precompute_ref: the reference log-probs are computed before training (no reference pass in the step).
        method: ``"hypo"`` adds the online samples' KV cache and their scoring pass: ``k_online`` samples of
            ``online_new_tokens`` per prompt of ``prompt_length`` tokens (default: half of ``max_length``).
        upcast_frozen: count float32 copies of the embeddings, norms and head (peft's k-bit preparation, TRL).
        autocast: the forward runs under bfloat16 autocast (``rpo_lib.train`` and TRL with ``bf16=True`` do).
        num_gpus, strategy: the plan of one GPU of ``num_gpus`` under ``"ddp"`` or ``"fsdp"`` (module docstring).
    """
    if isinstance(model, str):
        if model not in SHAPES:
            raise ValueError(f"no shape named {model!r}; known: {sorted(SHAPES)}. Pass a transformers config "
                             f"(AutoConfig.from_pretrained(id)) for any other model.")
        shape = SHAPES[model]
    elif isinstance(model, ModelShape):
        shape = model
    else:
        shape = ModelShape.from_config(getattr(model, "config", model))
    settings: dict[str, Any] = {
                "max_length": max_length, "pairs": pairs, "lora_r": lora_r, "quantization": quantization,
                "gradient_checkpointing": gradient_checkpointing, "logits": logits, "precompute_ref": precompute_ref,
                "real_tokens": real_tokens, "completion_tokens": completion_tokens, "method": method,
                "k_online": k_online, "master_bytes": master_bytes,
                "online_new_tokens": online_new_tokens, "prompt_length": prompt_length,
                "upcast_frozen": upcast_frozen, "autocast": autocast, "dtype_bytes": dtype_bytes,
                "num_gpus": num_gpus, "strategy": strategy}
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp'; got {strategy!r}.")
    for name in ("max_length", "pairs", "k_online", "online_new_tokens", "num_gpus"):
        if not isinstance(settings[name], int) or settings[name] < 1:
            raise ValueError(f"{name} must be a whole number >= 1; got {settings[name]!r}.")
    return _plan(shape, settings)


def _plan(shape: ModelShape, s: dict[str, Any]) -> MemoryPlan:
    dtype_bytes = s["dtype_bytes"]
    lora_r = s["lora_r"]
    per_weight = {"nf4": NF4_BYTES, "int8": INT8_BYTES, None: dtype_bytes}[s["quantization"]]
    scales = shape.num_hidden_layers * sum(out for _, out in shape.linear_shapes()) * 4 \
        if s["quantization"] == "int8" else 0
    frozen_bytes = 4 if s["upcast_frozen"] else dtype_bytes
    full = lora_r is None
    if full and s["quantization"] is not None:
        raise ValueError("quantised weights cannot be fine-tuned in full: give lora_r (QLoRA) or quantization=None.")
    master = s.get("master_bytes", 4)
    if full:  # the trained weights in their master dtype; gradients and AdamW's two moments in the same dtype
        layer_weights = shape.linear_parameters() * master
        weights = layer_weights + shape.other_parameters() * master
        trainable = 3 * shape.parameters() * master
        gradient_bytes = shape.parameters() * master
    else:
        layer_weights = shape.linear_parameters() * per_weight + scales  # what FSDP shards
        weights = layer_weights + shape.other_parameters() * frozen_bytes
        trainable = shape.lora_parameters(lora_r) * 16
        gradient_bytes = shape.lora_parameters(lora_r) * 4
    gpus = s["num_gpus"]
    sharded = s["strategy"] == "fsdp" and gpus > 1
    # FSDP shards the decoder layers' weights, except LLM.int8()'s, which stay whole (rpo_lib.parallel: a shard
    # would lose their scales); the root unit (embeddings, head, final norm) stays whole through the step.
    sharded_layers = 0.0 if s["quantization"] == "int8" else layer_weights
    if sharded:
        weights = layer_weights - sharded_layers + sharded_layers / gpus + (
            shape.other_parameters() * (master if full else frozen_bytes))
        trainable /= gpus
    tokens = s["real_tokens"] or 2 * s["pairs"] * s["max_length"]
    scored = (s["completion_tokens"] or tokens) if s["real_tokens"] else tokens  # positions given logits
    per_layer = activation_bytes_per_token(shape, lora_r=lora_r or 0, autocast=s["autocast"])
    layers, hidden = shape.num_hidden_layers, shape.hidden_size

    def activations(n_tokens: int) -> float:
        if s["gradient_checkpointing"]:  # each layer's input, and one layer recomputed during backward
            return n_tokens * (layers * hidden * dtype_bytes + per_layer)
        return n_tokens * layers * per_layer

    def logit_bytes(n_tokens: int) -> float:
        if s["logits"] == "full":  # bf16 logits, their float32 copy and the float32 log-softmax kept for backward
            return n_tokens * shape.vocab_size * (dtype_bytes + 4 + 4)
        # the model's logits at the scored positions, one float32 chunk, a log-normaliser and a log-prob per token
        return n_tokens * shape.vocab_size * dtype_bytes + CHUNK_BYTES + n_tokens * 4 * 2

    parts = {
        "weights": weights,
        "LoRA + AdamW state" if not full else "gradients + AdamW state": trainable,
    }
    reference_needed = s["method"] == "hypo" or not s["precompute_ref"]
    if full and reference_needed:  # rpo_lib.models.frozen_copy: nn.Linear layers (an untied head too) in the
        # compute dtype, the embeddings and norms as the master weights; whole on every GPU
        head = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size
        parts["reference copy"] = (shape.linear_parameters() + head) * dtype_bytes + (
            shape.other_parameters() - head) * master
    if sharded:  # the running layer and the prefetched next one, gathered whole (with their LoRA weights)
        lora_weights = shape.lora_parameters(lora_r) * 4 if not full else 0
        parts["FSDP gathered layers"] = 2 * (sharded_layers + lora_weights) / layers
    elif gpus > 1:
        parts["DDP gradient buckets"] = gradient_bytes
    parts.update({
        "activations": activations(tokens),
        "logits": logit_bytes(scored),
    })
    if not s["precompute_ref"]:  # a no-grad forward: one layer's working set and the logits
        parts["reference pass"] = tokens * per_layer + logit_bytes(scored) * (0.6 if s["logits"] == "full" else 1)
    if s["method"] == "hypo":
        prompt = s["prompt_length"] or s["max_length"] // 2
        rows = s["pairs"] * s["k_online"]
        online = rows * (prompt + s["online_new_tokens"])
        kv = 2 * layers * shape.num_key_value_heads * shape.head_dim * dtype_bytes
        parts["HyPO KV cache"] = online * kv
        parts["HyPO scoring"] = activations(online) + logit_bytes(online)
    return MemoryPlan(parts={k: float(v) for k, v in parts.items()}, settings=dict(s), shape=shape)


def shape_summary(shape: ModelShape) -> str:
    """One line: parameters (billions), layers, width, vocabulary."""
    return (f"{shape.parameters() / 1e9:.2f} B parameters, {shape.num_hidden_layers} layers, width "
            f"{shape.hidden_size}, vocabulary {shape.vocab_size:,}")


def replace(plan: MemoryPlan, **changes: Any) -> MemoryPlan:
    """The plan with some settings changed: ``replace(plan, pairs=1)``."""
    unknown = set(changes) - set(plan.settings)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(plan.settings)}.")
    return _plan(plan.shape, {**plan.settings, **changes})

