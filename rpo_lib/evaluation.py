"""Evaluate a trained policy against its reference: win rate under a reward model, KL to the reference.

::

    reward = load_reward_model("OpenAssistant/reward-model-deberta-v3-large-v2")
    report = compare_to_reference(trainer, prompt_ids, reward, max_new_tokens=256)
    report.win_rate, report.kl

For each prompt, one response is sampled from the policy and one from ``pi_ref`` (the trainer's reference: the base
with the adapter off, the SFT adapter, or ``ref_model``); the reward model scores both (a conversation through the
reward model's own chat template, else the prompt's text with its chat markers and the response), or a gold score
function does (``rpo_lib.chat_task.gold_score``); the policy wins when its score is higher (a tie counts half).
The KL is the Monte-Carlo estimate ``mean(log pi(y|x) - log pi_ref(y|x))`` over the policy's samples, whole
responses (summed log-probs): the quantity HyPO's online term pushes down (Song et al., Algorithm 1) and RPO
leaves to the SFT term.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rpo_lib import env
from rpo_lib.logprobs import completion_logprobs
from rpo_lib.models import as_reference
from rpo_lib.sample import Samples, sample

__all__ = ["Comparison", "GoldScore", "Prompt", "RewardModel", "compare_to_reference", "load_reward_model",
           "reward_scores", "tiny_reward_checkpoint"]


@dataclass(frozen=True)
class RewardModel:
    """A sequence-classification model with one output (the reward) and its tokenizer."""

    model: Any
    tokenizer: Any


def load_reward_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None, trust_remote_code: bool = False) -> RewardModel:
    """A reward model by hub id or local directory (``AutoModelForSequenceClassification`` with one label)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    place = torch.device(device) if device is not None else env.device()
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
    finished_policy: float = float("nan")  # share of the policy's samples that ended their turn
    finished_reference: float = float("nan")

    def __str__(self) -> str:
        return (f"win rate {self.win_rate:.2f} over {len(self.policy_texts)} prompts; mean reward "
                f"{self.reward_policy:.3f} (policy) vs {self.reward_reference:.3f} (reference); "
                f"KL(pi || pi_ref) = {self.kl:.3f} +- {self.kl_stderr:.3f} nats")


GoldScore = Callable[[str, bool], float]  # (response text, ended its turn) -> score; e.g. rpo_lib.chat_task.gold_score
Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]  # text, token ids, or a conversation (messages)


class _Sampler:
    """What an evaluation needs from a policy: samples and summed log-probs under it and under ``pi_ref``. A
    ``Trainer`` has them; a bare model (a loaded adapter with nothing trainable) gets them here."""

    def __init__(self, policy: Any, tokenizer: Any, ref_model: Any) -> None:
        self.trainer: Any = policy if hasattr(policy, "batch_loss") else None
        self.model: Any = policy
        tokenizer = tokenizer if tokenizer is not None else getattr(policy, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("compare_to_reference needs the tokenizer: pass tokenizer=... with a model.")
        self.tokenizer: Any = tokenizer
        self.ref_model = ref_model
        self.device = self.trainer.device if self.trainer is not None else next(policy.parameters()).device

    def sample(self, prompt_ids: list[list[int]], *, reference: bool, **kwargs: Any) -> Samples:
        if self.trainer is not None:
            return self.trainer.sample(prompt_ids, reference=reference, **kwargs)
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with contextlib.ExitStack() as stack:
            model = stack.enter_context(as_reference(self.model, ref_model=self.ref_model)) if reference \
                else self.model
            return sample(model, prompt_ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **kwargs)

    @torch.no_grad()
    def score(self, samples: Samples) -> tuple[Tensor, Tensor]:
        if self.trainer is not None:
            return self.trainer.score(samples)
        batch = {key: value.to(self.device) for key, value in samples.batch().items()}
        logp = completion_logprobs(self.model, **batch, reduction="sum")[0]
        with as_reference(self.model, ref_model=self.ref_model) as reference:
            ref_logp = completion_logprobs(reference, **batch, reduction="sum")[0]
        return logp, ref_logp


def _prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if prompt and isinstance(prompt[0], Mapping):
        return list(tokenizer.apply_chat_template(list(prompt), tokenize=True, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return [int(i) for i in prompt]  # type: ignore[arg-type]


def _reward_texts(reward: RewardModel, tokenizer: Any, prompts: Sequence[Prompt], prompt_ids: list[list[int]],
                  responses: list[str]) -> list[str]:
    """What the reward model reads: the conversation rendered by *its* chat template when the prompt is a
    conversation and it has one; else the prompt as the policy saw it (its chat markers kept, padding dropped) and
    the response."""
    template = getattr(reward.tokenizer, "chat_template", None)
    texts = []
    for prompt, ids, response in zip(prompts, prompt_ids, responses, strict=True):
        if template and not isinstance(prompt, str) and prompt and isinstance(prompt[0], Mapping):
            conversation = [*prompt, {"role": "assistant", "content": response}]
            texts.append(reward.tokenizer.apply_chat_template(conversation, tokenize=False))
        else:
            texts.append(tokenizer.decode(ids, skip_special_tokens=False) + response)
    return texts


def compare_to_reference(policy: Any, prompts: Sequence[Prompt], reward: RewardModel | GoldScore, *,
                         tokenizer: Any = None, ref_model: Any = None, max_new_tokens: int = 256,
                         temperature: float = 1.0, seed: int = 0) -> Comparison:
    """Sample one response per prompt from the policy and from ``pi_ref``, score both, and estimate
    ``KL(pi || pi_ref)`` from the policy's samples (see the module docstring).

    Args:
        policy: a ``Trainer``, or a model (a PEFT model whose adapters are turned off for ``pi_ref``, or any model
            with ``ref_model``): a loaded adapter needs nothing trainable to be evaluated.
        prompts: conversations (lists of messages, rendered by the policy's chat template with the generation
            prompt), texts, or token ids.
        reward: a ``RewardModel`` (it reads the conversation through its own chat template when it has one), or
            a gold score ``score(response_text, finished) -> float`` (``rpo_lib.chat_task.gold_score``).
        tokenizer: the policy's tokenizer (a ``Trainer`` has it).
        temperature: of both samplers (1: the policies themselves, as the KL estimate assumes).
        seed: both draw from it, so identical policies give identical responses (a win rate of 0.5)."""
    sampler = _Sampler(policy, tokenizer, ref_model)
    tokenizer = sampler.tokenizer
    prompt_ids = [_prompt_ids(tokenizer, p) for p in prompts]
    # Both sample from the same seed (common random numbers): where the two policies agree they draw the same
    # response, so the win rate measures where they differ, not the luck of the draw.
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    mine_samples = sampler.sample(prompt_ids, reference=False, **options,
                                  generator=torch.Generator(device=sampler.device).manual_seed(seed))
    their_samples = sampler.sample(prompt_ids, reference=True, **options,
                                   generator=torch.Generator(device=sampler.device).manual_seed(seed))
    logp, ref_logp = sampler.score(mine_samples)
    ratio = (logp - ref_logp).float().cpu()
    decode = tokenizer.decode
    policy_texts = [decode(list(y), skip_special_tokens=True) for y in mine_samples.completion_ids]
    reference_texts = [decode(list(y), skip_special_tokens=True) for y in their_samples.completion_ids]
    if isinstance(reward, RewardModel):
        mine = reward_scores(reward, _reward_texts(reward, tokenizer, prompts, prompt_ids, policy_texts))
        theirs = reward_scores(reward, _reward_texts(reward, tokenizer, prompts, prompt_ids, reference_texts))
    else:
        mine = torch.tensor([float(reward(t, bool(f))) for t, f in zip(policy_texts, mine_samples.finished)])
        theirs = torch.tensor([float(reward(t, bool(f))) for t, f in zip(reference_texts, their_samples.finished)])
    wins = (mine > theirs).float() + 0.5 * (mine == theirs).float()
    n = len(prompts)
    stderr = float(ratio.std()) / math.sqrt(n) if n > 1 else float("nan")
    return Comparison(win_rate=float(wins.mean()), reward_policy=float(mine.mean()),
                      reward_reference=float(theirs.mean()), kl=float(ratio.mean()), kl_stderr=stderr,
                      policy_texts=policy_texts, reference_texts=reference_texts,
                      finished_policy=float(mine_samples.finished.float().mean()),
                      finished_reference=float(their_samples.finished.float().mean()))
