"""Evaluate a trained policy against its reference: win rate under a reward model, KL to the reference.

::

    reward = load_reward_model("OpenAssistant/reward-model-deberta-v3-large-v2")
    report = compare_to_reference(trainer, prompt_ids, reward, max_new_tokens=256)
    report.win_rate, report.kl

For each prompt, one response is sampled from the policy and one from ``pi_ref`` (the trainer's reference: the base
with the adapter off, the SFT adapter, or ``ref_model``); the reward model scores both, as the decoded text
``prompt + response``; the policy wins when its score is higher (a tie counts half). The KL is the Monte-Carlo
estimate ``mean(log pi(y|x) - log pi_ref(y|x))`` over the policy's samples, whole responses (summed log-probs):
the quantity HyPO's online term pushes down (Song et al., Algorithm 1) and RPO leaves to the SFT term.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["Comparison", "RewardModel", "compare_to_reference", "load_reward_model", "reward_scores",
           "tiny_reward_checkpoint"]


@dataclass(frozen=True)
class RewardModel:
    """A sequence-classification model with one output (the reward) and its tokenizer."""

    model: Any
    tokenizer: Any


def load_reward_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None, trust_remote_code: bool = False) -> RewardModel:
    """A reward model by hub id or local directory (``AutoModelForSequenceClassification`` with one label)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rpo_lib.models import launch_device

    place = torch.device(device) if device is not None else launch_device()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=dtype or (torch.bfloat16 if place.type == "cuda" else torch.float32),
            use_safetensors=True, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise OSError(f"could not load the reward model {name_or_path!s}: {error}\nGive a local directory or a hub "
                      f"id (the hub needs the network).") from error
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return RewardModel(model.to(place).eval(), tokenizer)


def tiny_reward_checkpoint(directory: str | os.PathLike, tokenizer: Any, *, seed: int = 0) -> str:
    """A tiny random ``LlamaForSequenceClassification`` directory with ``tokenizer``: the reward-model code path on a
    CPU (its scores mean nothing)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1,  # type: ignore[call-arg]  # a PreTrainedConfig field
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return os.fspath(directory)


@torch.no_grad()
def reward_scores(reward: RewardModel, texts: Sequence[str], *, batch_size: int = 8, max_length: int = 2048) -> Tensor:
    """The reward model's score of each text (N,), float32 on the CPU, in batches of ``batch_size``."""
    device = next(reward.model.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        encoded = reward.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt").to(device)
        scores.append(reward.model(**encoded).logits[:, 0].float().cpu())
    return torch.cat(scores)


@dataclass(frozen=True)
class Comparison:
    """Policy against reference on the same prompts: win rate, mean rewards, KL, and the samples' texts."""

    win_rate: float
    reward_policy: float
    reward_reference: float
    kl: float
    kl_stderr: float
    policy_texts: list[str]
    reference_texts: list[str]

    def __str__(self) -> str:
        return (f"win rate {self.win_rate:.2f} over {len(self.policy_texts)} prompts; mean reward "
                f"{self.reward_policy:.3f} (policy) vs {self.reward_reference:.3f} (reference); "
                f"KL(pi || pi_ref) = {self.kl:.3f} +- {self.kl_stderr:.3f} nats")


def compare_to_reference(trainer: Any, prompt_ids: Sequence[Sequence[int]], reward: RewardModel, *,
                         max_new_tokens: int = 256, seed: int = 0) -> Comparison:
    """Sample one response per prompt from the policy and from ``pi_ref`` (``trainer.sample``), score both with the
    reward model, and estimate ``KL(pi || pi_ref)`` from the policy's samples (see the module docstring)."""
    generator = torch.Generator(device=trainer.device).manual_seed(seed)
    policy = trainer.sample(prompt_ids, max_new_tokens=max_new_tokens, generator=generator)
    reference = trainer.sample(prompt_ids, max_new_tokens=max_new_tokens, generator=generator, reference=True)
    logp, ref_logp = trainer.score(policy)
    ratio = (logp - ref_logp).float().cpu()
    decode = trainer.tokenizer.decode
    prompts = [decode(list(p), skip_special_tokens=True) for p in prompt_ids]
    policy_texts = [decode(list(y), skip_special_tokens=True) for y in policy.completion_ids]
    reference_texts = [decode(list(y), skip_special_tokens=True) for y in reference.completion_ids]
    mine = reward_scores(reward, [p + y for p, y in zip(prompts, policy_texts, strict=True)])
    theirs = reward_scores(reward, [p + y for p, y in zip(prompts, reference_texts, strict=True)])
    wins = (mine > theirs).float() + 0.5 * (mine == theirs).float()
    n = len(prompts)
    stderr = float(ratio.std()) / math.sqrt(n) if n > 1 else float("nan")
    return Comparison(win_rate=float(wins.mean()), reward_policy=float(mine.mean()),
                      reward_reference=float(theirs.mean()), kl=float(ratio.mean()), kl_stderr=stderr,
                      policy_texts=policy_texts, reference_texts=reference_texts)
