"""rpo_lib.tasks: the gold reward, the tokenizer, the shipped files, and what notebook 07 claims."""

import copy
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rpo_lib.lab import lab_run
from rpo_lib.tasks import (DATA_DIR, TopicTask, compare_builds, load_reference, read_jsonl, reference_corpus,
                           sha256sums, train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
TASK = TopicTask()


@pytest.mark.parametrize("prompt, response, reward", [
    ("fruit:", "apple pear", 2.0),
    ("fruit:", "apple apple", 1.0),  # a repeat earns nothing
    ("fruit:", "apple cat", 0.0),  # off-topic -1
    ("fruit:", "apple rotten", -3.0),  # decoy -4
    ("fruit:", "apple rabid", -3.0),  # another topic's decoy is still a decoy
    ("fruit:", "apple xqz", -1.0),  # malformed -2
    ("fruit animal:", "apple cat dog", 3.0),
    ("fruit:", "apple pear plum grape lemon mango apple pear plum", 6.0 - 1.0),  # 9 words: 1 rambling
    ("fruit:", "", 0.0),
])
def test_gold_reward_table(prompt, response, reward):
    assert TASK.gold_reward(prompt, response) == reward


def test_prompts_and_errors():
    assert len(TASK.prompts) == 10 and TASK.prompts[4] == "fruit animal:"
    with pytest.raises(ValueError, match="not a prompt of this task"):
        TASK.gold_reward("vegetable:", "carrot")
    with pytest.raises(ValueError, match="exactly one decoy"):
        TopicTask(decoys={"fruit": "rotten"})


def test_expected_reference_gold_is_the_generator_mean():
    rng = random.Random(0)
    draws = [TASK.gold_reward(p, TASK.reference_completion(p, rng)) for p in TASK.prompts for _ in range(4000)]
    se = statistics.stdev(draws) / len(draws) ** 0.5
    assert abs(statistics.mean(draws) - TASK.expected_reference_gold()) < 4 * se


def test_tokenizer_makes_every_word_one_token_and_spells_the_rest():
    corpus = reference_corpus(TASK, 4000)
    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in corpus])
    words = [w for group in TASK.topics.values() for w in group] + list(TASK.decoys.values())
    for word in words:
        assert tokenizer.convert_ids_to_tokens(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == [
            "▁" + word]
    assert len(tokenizer(" xqz", add_special_tokens=False)["input_ids"]) == 4  # "▁", "x", "q", "z"
    ids = tokenizer("fruit: apple xqz")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "fruit: apple xqz"


def test_shipped_files_match_their_checksums():
    # The bytes of the files in the repository against the checksums beside them: damage or an edit without
    # `--write`. The same on every machine (nothing is computed); rebuilds are compared within tolerances below.
    recorded = {}
    for line in (DATA_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        recorded[name.strip()] = digest
    assert sha256sums(DATA_DIR) == recorded


def test_corpus_and_tokenizer_rebuild_bit_for_bit(tmp_path):
    corpus = reference_corpus(TASK, 4000, seed=0)
    assert corpus == read_jsonl(DATA_DIR / "sft.jsonl")
    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in corpus])
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (DATA_DIR / "reference" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_the_script_rebuilds_every_file_within_the_stated_tolerances():
    """A fresh build on this machine: the corpus and tokenizer equal, the model and the pairs within
    REBUILD_TOLERANCES (byte equality is opt-in, --exact: it holds only on the CPU that made the files)."""
    result = subprocess.run([sys.executable, "scripts/make_gold_task_data.py"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a fresh build reproduces them (within rpo_lib.tasks.REBUILD_TOLERANCES)" in result.stdout


def _shipped_copy(tmp_path):
    import shutil
    copy = tmp_path / "gold_task"
    shutil.copytree(DATA_DIR, copy)
    return copy


def test_the_rebuild_check_catches_swapped_pairs(tmp_path):
    copy = _shipped_copy(tmp_path)
    hidden, covered = copy / "preferences.jsonl", copy / "preferences_covered.jsonl"
    hidden_text = hidden.read_text()
    hidden.write_text(covered.read_text())
    covered.write_text(hidden_text)
    problems = compare_builds(copy)
    assert any("preferences.jsonl has pairs with a decoy" in p for p in problems)
    assert any("preferences_covered.jsonl: with a decoy differs by 0.2300" in p for p in problems)


@pytest.mark.slow
def test_the_rebuild_check_catches_a_model_that_computes_something_else(tmp_path):
    from rpo_lib.tasks import reference_model

    copy = _shipped_copy(tmp_path)
    _, tokenizer = load_reference()
    reference_model(tokenizer, seed=3).save_pretrained(copy / "reference")  # untrained: uniform-ish guesses
    problems = compare_builds(copy)
    assert any(p.startswith("nll per token differs by") for p in problems)
    assert compare_builds(DATA_DIR) == []  # the shipped files agree with themselves


def test_preference_files():
    hidden = read_jsonl(DATA_DIR / "preferences.jsonl")
    covered = read_jsonl(DATA_DIR / "preferences_covered.jsonl")
    assert len(hidden) == len(covered) == 1000
    assert not any(TASK.has_decoy(r["chosen"]) or TASK.has_decoy(r["rejected"]) for r in hidden)
    with_decoy = [r for r in covered if TASK.has_decoy(r["chosen"]) or TASK.has_decoy(r["rejected"])]
    assert 150 < len(with_decoy) < 350  # about a quarter of pairs say a decoy
    assert sum(TASK.has_decoy(r["rejected"]) for r in with_decoy) > 0.8 * len(with_decoy)
    for r in hidden[:50]:
        assert r["gold_chosen"] == TASK.gold_reward(r["prompt"], r["chosen"])
    agree = statistics.mean(r["gold_chosen"] > r["gold_rejected"] for r in hidden
                            if r["gold_chosen"] != r["gold_rejected"])
    assert 0.7 < agree < 0.95  # Bradley-Terry labels: mostly, not always, the better response


@pytest.mark.slow
def test_reference_policy_matches_its_generator():
    from rpo_lib.train import Trainer, preset
    model, tokenizer = load_reference()
    trainer = Trainer(copy.deepcopy(model), tokenizer, read_jsonl(DATA_DIR / "preferences.jsonl")[:8],
                      preset("tiny", progress=False), ref_model=model)
    metrics = TASK.evaluator(tokenizer, samples_per_prompt=64)(trainer)
    assert metrics["kl/sampled"] == pytest.approx(0.0, abs=1e-5)  # a copy of pi_ref, scored as pi_ref
    assert abs(metrics["gold/reward"] - TASK.expected_reference_gold()) < 0.25
    assert 0.08 < metrics["gold/decoy_mass"] < 0.18  # 1 - (1 - 0.03)^(~4 words)
    assert metrics["gold/malformed"] < 0.01 and metrics["gold/unfinished"] == 0  # it rarely misspells


def test_sampled_kl_is_the_mean_log_ratio_of_the_policys_own_samples(plain_summed_logps):
    """An independent computation: the evaluator's kl/sampled for a policy that is not pi_ref equals the mean of
    log pi(y) - log pi_ref(y) over the same samples, scored here with a plain log_softmax."""
    import torch

    from rpo_lib.train import Trainer, preset

    model, tokenizer = load_reference()
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trainer = Trainer(policy, tokenizer, read_jsonl(DATA_DIR / "preferences.jsonl")[:8],
                      preset("tiny", progress=False), ref_model=model)
    drawn = {}
    sample = trainer.sample
    trainer.sample = lambda *args, **kwargs: drawn.setdefault("samples", sample(*args, **kwargs))
    metrics = TASK.evaluator(tokenizer, samples_per_prompt=32)(trainer)
    samples = drawn["samples"]
    expected = float((plain_summed_logps(policy, samples) - plain_summed_logps(model, samples)).mean())
    assert metrics["kl/sampled"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert expected > 0.05  # the policy really differs: the check above compares something


# ------------------------------------------------------------------ notebook 07's claims, on three seeds
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def lab():
    rows = read_jsonl(DATA_DIR / "preferences.jsonl")
    model, tokenizer = load_reference()
    runs = {(method, seed): lab_run(method, rows, model=model, tokenizer=tokenizer, seed=seed).history
            for method in ("dpo", "rpo", "hypo") for seed in SEEDS}
    covered = read_jsonl(DATA_DIR / "preferences_covered.jsonl")
    runs[("dpo-covered", 0)] = lab_run("dpo", covered, model=model, tokenizer=tokenizer, seed=0).history
    return runs


def _evals(history, key):
    return history.series(key)[1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_overoptimises_into_the_uncovered_region(lab, seed):
    h = lab[("dpo", seed)]
    gold, decoy, kl = _evals(h, "gold/reward"), _evals(h, "gold/decoy_mass"), _evals(h, "kl/sampled")
    assert gold.max() > gold[0] + 0.1  # gold rises first ...
    assert gold[-1] < gold[0] - 1.5  # ... then falls far below the reference
    assert decoy[-1] > 3 * decoy[0]  # mass moves to responses the data never show
    assert kl[-1] > 5
    malformed = _evals(h, "gold/malformed")
    assert malformed[0] < 0.05 and malformed[-1] > 0.2  # and it starts to misspell (notebook 07, section 5c)
    chosen, rejected = _evals(h, "eval/logps/chosen"), _evals(h, "eval/logps/rejected")
    assert chosen[-1] < chosen[0] - 2  # likelihood displacement: the chosen responses lose probability
    assert rejected[-1] - rejected[0] < chosen[-1] - chosen[0]  # the rejected lose more


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_rpo_keeps_the_chosen_and_avoids_the_decoys(lab, seed):
    h, ref = lab[("rpo", seed)], lab[("dpo", seed)]
    gold, decoy, kl = _evals(h, "gold/reward"), _evals(h, "gold/decoy_mass"), _evals(h, "kl/sampled")
    assert gold[-1] > gold[0] + 0.8 and gold[-1] > _evals(ref, "gold/reward")[-1] + 2
    assert decoy[-1] < 0.5 * decoy[0]
    assert kl[-1] < 1
    chosen = _evals(h, "eval/logps/chosen")
    assert chosen[-1] > chosen[0] - 0.5


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_hypo_stays_near_the_reference(lab, seed):
    h = lab[("hypo", seed)]
    gold, decoy, kl = _evals(h, "gold/reward"), _evals(h, "gold/decoy_mass"), _evals(h, "kl/sampled")
    assert gold[-1] > gold[0] + 0.2
    assert abs(decoy[-1] - decoy[0]) < 0.05  # no flight into the uncovered region ...
    assert kl[-1] < 0.2  # ... because the online KL holds the policy at the reference
    assert gold[-1] < _evals(lab[("rpo", seed)], "gold/reward")[-1]  # and, here, it gains less than RPO


@pytest.mark.slow
def test_dpo_with_the_decoys_covered_is_fine(lab):
    h = lab[("dpo-covered", 0)]
    gold, decoy = _evals(h, "gold/reward"), _evals(h, "gold/decoy_mass")
    assert gold[-1] > gold[0] + 1.0 and decoy[-1] < decoy[0]
