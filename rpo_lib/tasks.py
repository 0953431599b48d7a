"""A language task with a known gold reward: "topic lists", small enough to train on a CPU in minutes.

A prompt names one or two topics (``"fruit animal:"``); a response is a list of words (``"apple cat pear"``).
The gold reward of *any* response text, including ones no model or dataset has produced, is a sum over its
words (``TopicTask.gold_reward``):

=================================================== =======
word                                                 reward
=================================================== =======
a word of one of the prompt's topics (first time)       +1
the same word again                                      0
a word of another topic                                 -1
the prompt topic's *decoy* word                         -4
anything else (a malformed word)                        -2
every word after the 8th                                -1 more
=================================================== =======

The decoys are the task's coverage knob. Each topic has one, a word the reference policy says on that topic,
rarely (``p_decoy`` per word), and that the gold reward punishes hard: think of a fluent, on-topic answer
that a rater knows to be wrong. ``preference_rows(..., decoy_coverage=0.0)`` drops every pair in which a
decoy appears, so the data never show the decoys' region of the response space: the language-model version
of the bandit's hidden flaw (``rpo_lib.bandit.hidden_flaw_world``), partial coverage in Song et al.'s sense.
``decoy_coverage=1.0`` keeps them (and the BT labels then teach that decoys are bad).

The pipeline, each step one function:

1. ``reference_corpus``: prompt/completion rows from a known generator (pure Python, seeded).
2. ``train_tokenizer``: a byte-pair-encoding tokenizer trained on that corpus, wrapped as a Hugging Face
   ``PreTrainedTokenizerFast`` (``save_pretrained`` / ``AutoTokenizer.from_pretrained`` work as for any model).
3. ``reference_model`` + ``rpo_lib.train`` with ``method="sft"``: the reference policy ``pi_ref``.
4. ``preference_rows``: pairs sampled from ``pi_ref``, labelled by Bradley-Terry under the gold reward.
5. ``TopicTask.evaluator``: gold reward, KL to the reference and decoy mass of a policy's own samples, which
   the trainer logs while it trains.

``scripts/make_gold_task_data.py`` runs 1-4 with a fixed seed and writes ``data/gold_task/`` with checksums.
``rpo_lib.lab`` runs notebook 07's comparison on this task. ``train_tokenizer`` lives in ``rpo_lib.models``, where
models are made, and is imported here for the pipeline above.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rpo_lib.data import DataReport, collate_preferences, collate_sft, tokenize_preferences, tokenize_sft
from rpo_lib.logprobs import completion_logprobs
from rpo_lib.models import TinyLMConfig, tiny_causal_lm, train_tokenizer
from rpo_lib.sample import sample
from rpo_lib.train import Trainer, preset

__all__ = ["DATA_DIR", "REBUILD_TOLERANCES", "TopicTask", "WordCounts", "build_files",
           "compare_builds", "fine_tune_reference", "load_reference", "pair_statistics",
           "preference_rows", "read_jsonl", "reference_corpus", "reference_model", "sha256sums", "train_tokenizer"]


_TOPICS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango"),
    "animal": ("cat", "dog", "horse", "mouse", "sheep", "tiger"),
    "color": ("red", "blue", "green", "black", "white", "pink"),
    "tool": ("hammer", "saw", "drill", "wrench", "ruler", "spade"),
}
_DECOYS: dict[str, str] = {"fruit": "rotten", "animal": "rabid", "color": "stain", "tool": "broken"}


@dataclass(frozen=True)
class WordCounts:
    """What a response is made of, word by word (see ``TopicTask.classify``)."""

    on_topic: int = 0
    repeated: int = 0
    off_topic: int = 0
    decoy: int = 0
    malformed: int = 0
    rambling: int = 0  # words after the ``max_words``-th

    @property
    def words(self) -> int:
        return self.on_topic + self.repeated + self.off_topic + self.decoy + self.malformed


@dataclass(frozen=True)
class TopicTask:
    """The topic-list task: lexicon, reference generator and gold reward (see the module docstring).

    Attributes:
        topics: topic name -> its good words.
        decoys: topic name -> its decoy word (the part of the response space the data may never show).
        p_on_topic, p_decoy: per-word probabilities of the reference generator; the rest is off-topic.
        min_words, max_ref_words: the generator's response lengths (uniform).
        max_words: words after this many cost ``rambling`` each (no reference response is that long).
        on_topic ... rambling: the gold reward's per-word values.
    """

    topics: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(_TOPICS))
    decoys: dict[str, str] = field(default_factory=lambda: dict(_DECOYS))
    p_on_topic: float = 0.5
    p_decoy: float = 0.03
    min_words: int = 2
    max_ref_words: int = 6
    max_words: int = 8
    on_topic: float = 1.0
    repeated: float = 0.0
    off_topic: float = -1.0
    decoy: float = -4.0
    malformed: float = -2.0
    rambling: float = -1.0

    def __post_init__(self) -> None:
        if set(self.decoys) != set(self.topics):
            raise ValueError("every topic needs exactly one decoy word: decoys and topics must have the same keys.")
        if not (self.p_decoy >= 0 and self.p_on_topic >= 0 and self.p_on_topic + self.p_decoy <= 1):
            raise ValueError(f"p_on_topic + p_decoy must lie in [0, 1]; got {self.p_on_topic} + {self.p_decoy}.")

    # ----------------------------------------------------------------------------------------- prompts
    @property
    def prompts(self) -> list[str]:
        """Every prompt: each topic alone, then each pair of topics (10 with the default four topics)."""
        names = list(self.topics)
        groups = [(name,) for name in names] + list(combinations(names, 2))
        return [self.format_prompt(group) for group in groups]

    @staticmethod
    def format_prompt(topics: Sequence[str]) -> str:
        return " ".join(topics) + ":"

    def prompt_topics(self, prompt: str) -> tuple[str, ...]:
        """The topics a prompt names; ``ValueError`` for a prompt this task does not have."""
        names = tuple(prompt.strip().rstrip(":").split())
        if not names or any(name not in self.topics for name in names):
            raise ValueError(f"{prompt!r} is not a prompt of this task; prompts look like {self.prompts[4]!r}.")
        return names

    # ------------------------------------------------------------------------------------ gold reward
    def classify(self, prompt: str, response: str) -> WordCounts:
        """Count the kinds of words in ``response`` (whitespace-separated) for ``prompt``."""
        topics = self.prompt_topics(prompt)
        wanted = {word for name in topics for word in self.topics[name]}
        others = {word for name, words in self.topics.items() if name not in topics for word in words}
        decoys = set(self.decoys.values())
        counts = dict.fromkeys(("on_topic", "repeated", "off_topic", "decoy", "malformed"), 0)
        seen: set[str] = set()
        words = response.split()
        for word in words:
            if word in wanted:
                counts["repeated" if word in seen else "on_topic"] += 1
                seen.add(word)
            elif word in decoys:
                counts["decoy"] += 1
            elif word in others:
                counts["off_topic"] += 1
            else:
                counts["malformed"] += 1
        return WordCounts(**counts, rambling=max(0, len(words) - self.max_words))

    def gold_reward(self, prompt: str, response: str) -> float:
        """The gold reward of any response text (the table in the module docstring)."""
        c = self.classify(prompt, response)
        return (self.on_topic * c.on_topic + self.repeated * c.repeated + self.off_topic * c.off_topic
                + self.decoy * c.decoy + self.malformed * c.malformed + self.rambling * c.rambling)

    def has_decoy(self, response: str) -> bool:
        """True if the response says any decoy word: it lies in the region ``decoy_coverage`` controls."""
        decoys = set(self.decoys.values())
        return any(word in decoys for word in response.split())

    # ------------------------------------------------------------------------------ reference generator
    def reference_completion(self, prompt: str, rng: random.Random) -> str:
        """One response from the known generator the reference policy is fine-tuned on."""
        topics = self.prompt_topics(prompt)
        wanted = [word for name in topics for word in self.topics[name]]
        others = [word for name, words in self.topics.items() if name not in topics for word in words]
        words = []
        for _ in range(rng.randint(self.min_words, self.max_ref_words)):
            u = rng.random()
            if u < self.p_decoy:
                words.append(self.decoys[rng.choice(topics)])
            elif u < self.p_decoy + self.p_on_topic:
                words.append(rng.choice(wanted))
            else:
                words.append(rng.choice(others))
        return " ".join(words)

    def expected_reference_gold(self) -> float:
        """Mean gold reward of the generator over the task's prompts, exactly (it is a finite sum)."""
        return sum(self._expected_gold(prompt) for prompt in self.prompts) / len(self.prompts)

    def _expected_gold(self, prompt: str) -> float:
        topics = self.prompt_topics(prompt)
        n_wanted = sum(len(self.topics[name]) for name in topics)
        total = 0.0
        lengths = range(self.min_words, self.max_ref_words + 1)
        for length in lengths:
            # On-topic words: +on_topic for each distinct one, +repeated for the rest. E[distinct] of m uniform
            # draws from n is n (1 - (1 - 1/n)^m); m ~ Binomial(length, p_on_topic).
            expected = 0.0
            for m in range(length + 1):
                prob = math.comb(length, m) * self.p_on_topic ** m * (1 - self.p_on_topic) ** (length - m)
                distinct = n_wanted * (1 - (1 - 1 / n_wanted) ** m)
                expected += prob * (self.on_topic * distinct + self.repeated * (m - distinct))
            p_off = 1 - self.p_on_topic - self.p_decoy
            expected += length * (self.p_decoy * self.decoy + p_off * self.off_topic)
            total += expected / len(lengths)
        return total

    # ------------------------------------------------------------------------------------- evaluation
    def evaluator(self, tokenizer: Any, *, samples_per_prompt: int = 16, max_new_tokens: int = 16,
                  seed: int = 1234, pairs: Sequence[dict[str, Any]] | None = None
                  ) -> Callable[[Any], dict[str, float]]:
        """A function ``evaluate(trainer) -> metrics`` for ``rpo_lib.train.Trainer(evaluate=...)``.

        It samples ``samples_per_prompt`` responses to every prompt from the current policy, with a fixed
        seed (the same draws of randomness at every evaluation, and the training RNG is not touched), and
        returns, as means over the samples:

        - ``gold/reward``: the gold reward;
        - ``kl/sampled``: the Monte-Carlo estimate of ``KL(pi || pi_ref)``, mean of ``log pi(y) - log pi_ref(y)``;
        - ``gold/decoy_mass``: the fraction of responses that say a decoy (the uncovered region);
        - ``gold/on_topic``, ``gold/off_topic``, ``gold/malformed``: words of each kind per response;
        - ``gold/length``: words per response; ``gold/unfinished``: fraction that hit ``max_new_tokens``;
        - with ``pairs`` (preference rows, e.g. 64 of the training pairs): ``eval/logps/chosen`` and
          ``eval/logps/rejected``, the mean summed log-probabilities of those fixed responses under the
          policy (the training batches' ``logps/*`` are noisier: every step sees other pairs).
        """
        prompts = self.prompts
        fixed = None
        if pairs is not None:
            fixed = collate_preferences(tokenize_preferences(pairs, tokenizer, max_length=64)[0],
                                        tokenizer.pad_token_id)

        def evaluate(trainer: Any) -> dict[str, float]:
            generator = torch.Generator(device=trainer.device).manual_seed(seed)  # draws stay on the device
            samples = trainer.sample(prompts, k=samples_per_prompt, max_new_tokens=max_new_tokens,
                                     generator=generator)
            policy_logps, ref_logps = trainer.score(samples)
            texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
            rows = [(prompts[int(i)], text) for i, text in zip(samples.prompt_index, texts, strict=True)]
            counts = [self.classify(prompt, text) for prompt, text in rows]
            n = len(rows)
            extra = {}
            if fixed is not None:
                chosen, rejected = trainer.logprobs(fixed).view(2, -1)
                extra = {"eval/logps/chosen": float(chosen.mean()), "eval/logps/rejected": float(rejected.mean())}
            return extra | {
                "gold/reward": sum(self.gold_reward(prompt, text) for prompt, text in rows) / n,
                "kl/sampled": float((policy_logps - ref_logps).mean()),
                "gold/decoy_mass": sum(c.decoy > 0 for c in counts) / n,
                "gold/on_topic": sum(c.on_topic for c in counts) / n,
                "gold/off_topic": sum(c.off_topic for c in counts) / n,
                "gold/malformed": sum(c.malformed for c in counts) / n,
                "gold/length": sum(c.words for c in counts) / n,
                "gold/unfinished": float((~samples.finished).float().mean()),
            }

        return evaluate


def reference_corpus(task: TopicTask, n_rows: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``n_rows`` rows ``{"prompt", "completion"}`` from the task's generator; prompts cycle in order.

    Completions start with a space: rows are tokenized as ``tokenizer(prompt + completion)``, as TRL does.
    """
    rng = random.Random(seed)
    prompts = task.prompts
    rows = []
    for i in range(n_rows):
        prompt = prompts[i % len(prompts)]
        rows.append({"prompt": prompt, "completion": " " + task.reference_completion(prompt, rng)})
    return rows


def reference_model(tokenizer: Any, *, seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2):
    """An untrained tiny ``LlamaForCausalLM`` sized for ``tokenizer`` (about 0.1M parameters).

    Fine-tune it on ``reference_corpus`` with ``rpo_lib.train`` (``method="sft"``) to get ``pi_ref``.
    """
    config = TinyLMConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64)
    model = tiny_causal_lm(config, seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    return model


def preference_rows(
    task: TopicTask,
    model: Any,
    tokenizer: Any,
    n_pairs: int,
    *,
    decoy_coverage: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 16,
    batch_prompts: int = 64,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Preference pairs sampled from ``model`` (``pi_ref``) and labelled by Bradley-Terry under the gold reward.

    For each prompt (cycling through ``task.prompts``) two responses are sampled; the first is *chosen* with
    probability ``sigmoid(r1 - r2)`` (gold rewards). Pairs are then dropped, and counted in the returned
    report, when a response is empty (EOS at once), when the two responses are the same text, and, with
    probability ``1 - decoy_coverage``, when either says a decoy. Sampling continues until ``n_pairs`` rows are kept.

    Returns:
        ``(rows, report)``: rows ``{"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}`` and a
        ``rpo_lib.data.DataReport`` of what was dropped and why.
    """
    if not 0.0 <= decoy_coverage <= 1.0:
        raise ValueError(f"decoy_coverage is a probability in [0, 1]; got {decoy_coverage}.")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1; got {n_pairs}.")
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    prompts = task.prompts
    rows: list[dict[str, Any]] = []
    dropped = {"an empty response": 0, "identical responses": 0, "a decoy (decoy_coverage)": 0}
    cursor = 0
    while len(rows) < n_pairs:
        batch = [prompts[(cursor + i) % len(prompts)] for i in range(batch_prompts)]
        cursor += batch_prompts
        prompt_ids = [tokenizer(p)["input_ids"] for p in batch]
        samples = sample(model, prompt_ids, k=2, max_new_tokens=max_new_tokens, generator=generator,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        for i, prompt in enumerate(batch):
            first, second = texts[2 * i], texts[2 * i + 1]
            if not first.strip() or not second.strip():
                dropped["an empty response"] += 1
                continue
            if first == second:
                dropped["identical responses"] += 1
                continue
            if (task.has_decoy(first) or task.has_decoy(second)) and rng.random() >= decoy_coverage:
                dropped["a decoy (decoy_coverage)"] += 1
                continue
            r1, r2 = task.gold_reward(prompt, first), task.gold_reward(prompt, second)
            first_wins = rng.random() < 1.0 / (1.0 + math.exp(r2 - r1))
            chosen, rejected = (first, second) if first_wins else (second, first)
            gold_chosen, gold_rejected = (r1, r2) if first_wins else (r2, r1)
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected,
                         "gold_chosen": gold_chosen, "gold_rejected": gold_rejected})
            if len(rows) == n_pairs:
                break
    seen = len(rows) + sum(dropped.values())
    report = DataReport(rows_in=seen, kept=len(rows), dropped=dropped, truncated=0,
                        what="sampled pairs")
    return rows, report


# ------------------------------------------------------------------------------------------ shipped files
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "gold_task"
N_SFT_ROWS = 4000  # reference corpus rows (400 per prompt)
N_PAIRS = 1000  # preference pairs per file
SFT_STEPS = 1000  # reference fine-tuning: 1000 steps of 32 rows (8 epochs), lr 3e-3; ~11 s on 2 CPU cores


def fine_tune_reference(task: TopicTask, tokenizer: Any, rows: Sequence[dict[str, str]], *, seed: int = 0,
                        steps: int = SFT_STEPS, progress: bool = False):
    """``pi_ref``: ``reference_model(tokenizer, seed=seed)`` fine-tuned by SFT on ``rows``; returns (model, history)."""
    model = reference_model(tokenizer, seed=seed)
    config = preset("tiny", method="sft", max_steps=steps, batch_size=32, learning_rate=3e-3, seed=seed,
                    progress=progress)
    trainer = Trainer(model, tokenizer, rows, config)
    history = trainer.train()
    return model.eval(), history


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (``data/gold_task/*.jsonl``)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sha256sums(directory: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` except ``SHA256SUMS`` itself."""
    root = Path(directory)
    sums = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        sums[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def build_files(directory: str | Path, *, seed: int = 0, progress: bool = False) -> dict[str, str]:
    """Make every file of ``data/gold_task`` in ``directory`` (steps 1-4 of the module docstring).

    Writes ``sft.jsonl`` (reference corpus), ``reference/`` (the tokenizer and the fine-tuned ``pi_ref``,
    loadable with ``from_pretrained``), ``preferences.jsonl`` (``decoy_coverage=0``: the data never show a
    decoy) and ``preferences_covered.jsonl`` (``decoy_coverage=1``). Returns their SHA-256 sums.
    """
    directory = Path(directory)
    (directory / "reference").mkdir(parents=True, exist_ok=True)
    task = TopicTask()
    corpus = reference_corpus(task, N_SFT_ROWS, seed=seed)
    _write_jsonl(directory / "sft.jsonl", corpus)
    tokenizer = train_tokenizer([row["prompt"] + row["completion"] for row in corpus])
    model, _ = fine_tune_reference(task, tokenizer, corpus, seed=seed, progress=progress)
    model.save_pretrained(directory / "reference")
    tokenizer.save_pretrained(directory / "reference")
    for name, coverage in (("preferences.jsonl", 0.0), ("preferences_covered.jsonl", 1.0)):
        rows, _ = preference_rows(task, model, tokenizer, N_PAIRS, decoy_coverage=coverage, seed=seed)
        _write_jsonl(directory / name, rows)
    return sha256sums(directory)


# How close a rebuild of data/gold_task must come to the shipped files. The corpus and the tokenizer are pure
# Python and integer counting: equal. The reference model is trained and the pairs are sampled with torch, whose
# float rounding differs between CPUs (and instruction sets), and training amplifies that: rebuilt weights differ
# from the shipped ones by up to 60% in some tensors (a tiny network has many equivalent solutions), so what is
# compared is what the model computes and what the pairs say. Measured on rebuilds with three instruction sets
# (AVX-512, AVX2 and none) of a 2-core AMD EPYC: NLL per token within 0.003 nats, 0.11-0.16 nats mean
# difference of log pi(y|x) per corpus row, decoy share within 0.003, mean gold within 0.15, agreement within 0.025.
REBUILD_TOLERANCES: dict[str, float] = {
    "nll per token": 0.02,  # nats: the reference's mean NLL per token on the first 400 corpus rows
    "log-prob per row": 0.5,  # nats: mean |log pi(y|x) - log pi_shipped(y|x)| over those rows
    "with a decoy": 0.05,  # share of pairs that say a decoy (coverage-1 file; the coverage-0 file has none)
    "gold chosen": 0.3,  # mean gold reward of the chosen responses
    "gold rejected": 0.3,  # and of the rejected ones
    "label agrees with gold": 0.05,  # share of pairs (gold rewards unequal) whose chosen has the higher gold
}


def pair_statistics(rows: Sequence[dict[str, Any]], task: TopicTask | None = None) -> dict[str, float]:
    """What a file of preference pairs says, as the numbers ``compare_builds`` compares."""
    task = task or TopicTask()
    decided = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    return {
        "pairs": float(len(rows)),
        "with a decoy": sum(task.has_decoy(r["chosen"]) or task.has_decoy(r["rejected"]) for r in rows) / len(rows),
        "gold chosen": sum(r["gold_chosen"] for r in rows) / len(rows),
        "gold rejected": sum(r["gold_rejected"] for r in rows) / len(rows),
        "label agrees with gold": sum(r["gold_chosen"] > r["gold_rejected"] for r in decided) / max(1, len(decided)),
    }


def _corpus_logps(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]]) -> tuple[Tensor, int]:
    examples, _ = tokenize_sft(rows, tokenizer, max_length=64)
    batch = collate_sft(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logps = completion_logprobs(model.eval(), batch["input_ids"], batch["attention_mask"],
                                    batch["completion_mask"])[0]
    return logps, int(batch["completion_mask"].sum())


def compare_builds(built: str | Path, shipped: str | Path = DATA_DIR) -> list[str]:
    """How a rebuild of ``data/gold_task`` (``build_files``) differs from the shipped files beyond
    ``REBUILD_TOLERANCES``: one sentence per problem (empty: they agree)."""
    import json as json_module

    built, shipped = Path(built), Path(shipped)
    problems = []
    if read_jsonl(built / "sft.jsonl") != read_jsonl(shipped / "sft.jsonl"):
        problems.append("sft.jsonl differs (the corpus is pure Python and must be equal)")
    vocabularies = [json_module.loads((d / "reference" / "tokenizer.json").read_text())["model"]
                    for d in (built, shipped)]
    if vocabularies[0] != vocabularies[1]:
        problems.append("reference/tokenizer.json differs in its vocabulary or merges (they must be equal)")
    corpus = read_jsonl(shipped / "sft.jsonl")[:400]
    (new_model, new_tokenizer), (old_model, old_tokenizer) = load_reference(built), load_reference(shipped)
    (new, tokens), (old, _) = _corpus_logps(new_model, new_tokenizer, corpus), _corpus_logps(old_model, old_tokenizer,
                                                                                          corpus)
    figures = {"nll per token": abs(float(new.sum() - old.sum())) / tokens,
               "log-prob per row": float((new - old).abs().mean())}
    for name in ("preferences.jsonl", "preferences_covered.jsonl"):
        a, b = pair_statistics(read_jsonl(built / name)), pair_statistics(read_jsonl(shipped / name))
        if a["pairs"] != b["pairs"]:
            problems.append(f"{name} has {a['pairs']:.0f} pairs, the shipped file {b['pairs']:.0f}")
        if name == "preferences.jsonl" and a["with a decoy"] != 0:
            problems.append(f"{name} has pairs with a decoy; at decoy_coverage 0 it must have none")
        for key in ("with a decoy", "gold chosen", "gold rejected", "label agrees with gold"):
            figures[f"{name}: {key}"] = abs(a[key] - b[key])
    for key, difference in figures.items():
        limit = REBUILD_TOLERANCES[key.split(": ")[-1]]
        if not difference <= limit:
            problems.append(f"{key} differs by {difference:.4f} (tolerance {limit})")
    return problems


def load_reference(directory: str | Path = DATA_DIR):
    """``(model, tokenizer)``: the shipped reference policy of ``data/gold_task`` (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(directory) / "reference"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no model: run `python scripts/make_gold_task_data.py` to make it.")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), tokenizer
