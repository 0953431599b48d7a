"""The notebooks' exercises: expected answers live here, not next to the learner's cell, and checks compare.

Two kinds:

- ``check(exercise_id, answer, **context)``: a number, a list of numbers, a tensor or a word. Numbers are compared
  with the exercise's tolerance; words case-insensitively, ignoring surrounding spaces and quotes. ``context``
  passes what the answer depends on in the notebook (a trained run, a world), never the answer.
- ``check_implementation(exercise_id, function)``: "implement it" exercises. The learner's function is called on
  random inputs and compared with the library's implementation.

An unanswered exercise (``None``) prints a reminder and returns False: a notebook runs to the end untouched. A wrong
answer prints the learner's value and a hint, never the expected value. ``tests/test_exercises.py`` checks that
every exercise accepts its right answer and rejects wrong ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["EXERCISES", "Exercise", "Implementation", "check", "check_implementation"]


@dataclass(frozen=True)
class Exercise:
    """An exercise with an answer: ``expected(**context)`` computes it (from the library where possible)."""

    expected: Callable[..., Any]
    hint: str
    atol: float = 1e-6
    rtol: float = 0.0


@dataclass(frozen=True)
class Implementation:
    """An "implement it" exercise: ``reference(*inputs)`` is the library's answer on ``inputs(generator)``."""

    reference: Callable[..., Any]
    inputs: Callable[[torch.Generator], tuple]
    hint: str
    trials: int = 5
    atol: float = 1e-5
    rtol: float = 1e-5


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).cpu()
    return torch.as_tensor(value, dtype=torch.float64)


def _normalise_word(value: str) -> str:
    return value.strip().strip("'\"` ").lower()


def _same(answer, expected, atol: float, rtol: float) -> tuple[bool, str]:
    """(equal?, what to tell the learner about their answer when it is not)."""
    if isinstance(expected, str):
        if not isinstance(answer, str):
            return False, f"the answer is a word; got {type(answer).__name__}"
        return _normalise_word(answer) == _normalise_word(expected), f"got {answer!r}"
    try:
        got, want = _as_tensor(answer), _as_tensor(expected)
    except (TypeError, ValueError, RuntimeError):
        return False, f"the answer is a number or a list of numbers; got {type(answer).__name__}"
    if got.shape != want.shape:
        return False, f"got shape {tuple(got.shape)}, which is not the shape of the answer"
    ok = bool(torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=False))
    if got.numel() == 1:
        return ok, f"got {float(got):.6g}" if math.isfinite(float(got)) else f"got {float(got)}"
    return ok, "the values differ"


def check(exercise_id: str, answer, **context) -> bool:
    """Compare ``answer`` with the expected answer of ``exercise_id`` (e.g. ``"05.E1"``); print, return the verdict."""
    exercise = EXERCISES.get(exercise_id)
    if not isinstance(exercise, Exercise):
        known = sorted(k for k, v in EXERCISES.items() if isinstance(v, Exercise))
        raise KeyError(f"no answer exercise {exercise_id!r}; known: {known}")
    if answer is None:
        print(f"{exercise_id}: not answered yet. Replace `None` with your answer and run the cell again.")
        return False
    ok, detail = _same(answer, exercise.expected(**context), exercise.atol, exercise.rtol)
    print(f"{exercise_id}: correct." if ok else f"{exercise_id}: not yet ({detail}). Hint: {exercise.hint}")
    return ok


def check_implementation(exercise_id: str, function: Callable | None, *, seed: int = 0) -> bool:
    """Call ``function`` on random inputs and compare it with the library; print and return the verdict."""
    exercise = EXERCISES.get(exercise_id)
    if not isinstance(exercise, Implementation):
        raise KeyError(f"no implementation exercise {exercise_id!r}")
    if function is None:
        print(f"{exercise_id}: not implemented yet. Write the function, pass it instead of `None`, run again.")
        return False
    generator = torch.Generator().manual_seed(seed)
    for trial in range(exercise.trials):
        inputs = exercise.inputs(generator)
        try:
            got = function(*inputs)
        except Exception as error:  # the learner's code: report, never crash the notebook
            print(f"{exercise_id}: your function raised {type(error).__name__}: {error}. Hint: {exercise.hint}")
            return False
        ok, detail = _same(got, exercise.reference(*inputs), exercise.atol, exercise.rtol)
        if not ok:
            print(f"{exercise_id}: not yet: on random input {trial + 1} of {exercise.trials} it differs from the "
                  f"library ({detail}). Hint: {exercise.hint}")
            return False
    print(f"{exercise_id}: correct on {exercise.trials} random inputs.")
    return True


# ------------------------------------------------------------------------------------------ random inputs
def _pairs(generator: torch.Generator, batch: int = 6) -> tuple:
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta): sequence log-probs of a batch."""
    logps = -torch.rand(4, batch, generator=generator, dtype=torch.float64) * 20
    beta = float(torch.rand(1, generator=generator)) * 0.9 + 0.05
    return (*logps, beta)


def _rpo_inputs(generator: torch.Generator) -> tuple:
    batch, length = 5, 7
    tokens = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 4
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    chosen = (tokens * mask).sum(1)
    rejected, ref_chosen, ref_rejected = -torch.rand(3, batch, generator=generator, dtype=torch.float64) * 20
    beta = float(torch.rand(1, generator=generator)) * 0.5 + 0.01
    eta = float(torch.rand(1, generator=generator)) * 3
    return chosen, rejected, ref_chosen, ref_rejected, tokens, mask, beta, eta


def _bt_inputs(generator: torch.Generator) -> tuple:
    scale = 10.0 ** torch.randint(0, 3, (1,), generator=generator).item()
    chosen, rejected = torch.randn(2, 8, generator=generator, dtype=torch.float64) * scale
    chosen[0], rejected[0] = -500.0, 500.0  # a pair the reward gets badly wrong: exp(1000) overflows
    return chosen, rejected


def _optimal_inputs(generator: torch.Generator) -> tuple:
    ref_logps = torch.log_softmax(torch.randn(3, 6, generator=generator, dtype=torch.float64), dim=-1)
    rewards = torch.randn(3, 6, generator=generator, dtype=torch.float64) * 3
    return ref_logps, rewards, float(torch.rand(1, generator=generator)) * 2 + 0.05


def _ball_inputs(generator: torch.Generator) -> tuple:
    q = float(10 ** (-torch.rand(1, generator=generator) * 4))  # 1e-4 .. 1
    return min(q, 0.9), float(torch.rand(1, generator=generator)) * 3


def _family_inputs(generator: torch.Generator) -> tuple:
    q = float(10 ** (-1 - torch.rand(1, generator=generator) * 5))
    return q, float(torch.rand(1, generator=generator)) * 0.98, float(torch.rand(1, generator=generator)) + 0.1


def _kl_inputs(generator: torch.Generator) -> tuple:
    return (torch.randn(4, 3, generator=generator, dtype=torch.float64) * 5,)


def _sample_inputs(generator: torch.Generator) -> tuple:
    sample_logps = -torch.rand(6, 4, generator=generator, dtype=torch.float64) * 30
    return sample_logps, sample_logps - torch.randn(6, 4, generator=generator, dtype=torch.float64) * 3


# ---------------------------------------------------------------------------------------- references
def _dpo(chosen, rejected, ref_chosen, ref_rejected, beta):
    from rpo_lib.losses import dpo_loss

    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta).loss


def _rpo(chosen, rejected, ref_chosen, ref_rejected, tokens, mask, beta, eta):
    from rpo_lib.losses import rpo_loss

    return rpo_loss(chosen, rejected, ref_chosen, ref_rejected, tokens, mask, beta=beta, eta=eta,
                    normalization="sum").loss


def _bt(chosen_rewards, rejected_rewards):
    from rpo_lib.bt import bt_loss

    return bt_loss(chosen_rewards, rejected_rewards)


def _optimal(ref_logps, rewards, beta):
    return torch.log_softmax(ref_logps + rewards / beta, dim=-1)  # the closed form of docs/math.md section 2


def _ball(q, kappa):
    from rpo_lib.coverage import kl_ball_ratio

    return kl_ball_ratio(q, kappa) * q


def _family_kl(q, y3_mass, beta):
    from rpo_lib import bandit

    world = bandit.three_response_world(q)
    return world.reverse_kl(bandit.prop41_policy(world, beta, y3_mass))


def _rloo(kl_per_sample):
    from rpo_lib.losses import rloo_advantages

    return rloo_advantages(kl_per_sample)


def _kl_estimate(sample_logps, ref_sample_logps):
    from rpo_lib.losses import online_kl_loss

    return online_kl_loss(sample_logps, ref_sample_logps)[1]


def _bandit_world_value(world, beta):
    return world.objective(world.optimal_logps(beta), beta)


def _decoy_winner(histories, methods):
    return min(methods, key=lambda m: histories[m, 0].last("gold/decoy_mass"))


def _implicit_chosen_reward(histories, beta=0.1):
    _, chosen = histories["dpo", 0].series("eval/logps/chosen")
    return beta * (chosen[-1] - chosen[0])


def _prop41_loss_gap():
    from rpo_lib import bandit

    world = bandit.three_response_world(1e-4)
    return (world.population_loss(bandit.prop41_policy(world, 0.5, 0.9), beta=0.5)
            - world.population_loss(world.optimal_logps(0.5), beta=0.5))


def _linear_coverage_of_flaw():
    from rpo_lib import bandit, coverage

    world = bandit.hidden_flaw_world(0)
    covered = world.features[0, world.covered[0]]
    flawed = world.features[0, -1]
    return coverage.linear_coverage(coverage.feature_covariance(covered), torch.outer(flawed, flawed))


def _mistral_lora_state_gib() -> float:
    from rpo_lib.memory import SHAPES

    return SHAPES["mistral-7b"].lora_parameters(16) * 16 / 2**30


def _length_inputs(generator: torch.Generator) -> tuple:
    n = int(torch.randint(2, 9, (1,), generator=generator))
    return (torch.randint(1, 2048, (n,), generator=generator).tolist(),)


def _padding_fraction(lengths) -> float:
    from rpo_lib.packing import padding_fraction

    return padding_fraction(list(lengths))


def _passes_per_process() -> int:
    from rpo_lib.parallel import micro_batches, shard

    counts = set()
    for rank in range(4):
        indices, stand_ins = shard(list(range(13)), rank, 4)
        counts.add(len(micro_batches(len(indices) - stand_ins, len(indices), 3)))
    assert len(counts) == 1  # every process runs the same number of passes
    return counts.pop()


def _shard_sft_inputs(generator: torch.Generator) -> tuple:
    batch, length = 3, 6
    token_logps = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 5
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    others = int(torch.randint(1, 40, (1,), generator=generator))  # the other processes' chosen tokens
    return token_logps, mask, int(mask.sum()) + others


def _shard_sft(token_logps, mask, global_tokens) -> torch.Tensor:
    from rpo_lib.losses import sft_loss

    return sft_loss(token_logps, mask, normalization="token_mean", token_count=global_tokens)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


EXERCISES: dict[str, Exercise | Implementation] = {
    # 00 · start here
    "00.E1": Exercise(lambda: math.log(1 + math.exp(-1.0)), "-log s(beta * [(+1) - (-1)]) with s the sigmoid."),
    "00.I1": Implementation(_dpo, _pairs, "margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected)); "
                            "the loss is the batch mean of -logsigmoid(margin)."),
    # 01 · Bradley-Terry
    "01.E1": Exercise(lambda: _sigmoid(0.5 - 2.0), "P(b preferred) = s(r_b - r_a).", atol=1e-4),
    "01.E2": Exercise(lambda: -_sigmoid(-1.0), "d/dz [-log s(z)] = -(1 - s(z)); with z = r+ - r-, dz/dr+ = 1.",
                      atol=1e-4),
    "01.E3": Exercise(lambda: _sigmoid(-3.0), "The largest reward gap is 2R; use s(-2R).", atol=1e-4),
    "01.I1": Implementation(_bt, _bt_inputs, "-log s(z) = log(1 + exp(-z)) overflows for very negative z: use "
                            "torch.nn.functional.logsigmoid (or softplus(-z)). Average over the batch."),
    # 02 · the KL objective and DPO
    "02.E1": Exercise(lambda: _sigmoid(1.0), "pi*(y1) = pi_ref(y1) e^{r1/beta} / sum_y pi_ref(y) e^{r(y)/beta}.",
                      atol=1e-4),
    "02.E2": Exercise(lambda world: _bandit_world_value(world, 2.0),
                      "J(pi*) = beta * log Z with Z = sum_y pi_ref(y) exp(r*(y)/beta)."),
    "02.E3": Exercise(lambda: "forward", "Under which policy is each KL an expectation?"),
    "02.I1": Implementation(_optimal, _optimal_inputs, "pi* is proportional to pi_ref * exp(r / beta): add in log "
                            "space, then normalise each row with torch.log_softmax."),
    # 03 · coverage
    "03.E1": Exercise(lambda: 20.0, "The worst policy puts all its mass on the rarest response."),
    "03.E2": Exercise(lambda: 0.2 * math.log(20) + 0.8 * math.log(0.8 / 0.99),
                      "p log(p/q) + (1-p) log((1-p)/(1-q))."),
    "03.E3": Exercise(_linear_coverage_of_flaw, "Its first coordinate is 1, a direction the data never vary."),
    "03.I1": Implementation(_ball, _ball_inputs, "kl(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q)) grows on [q, 1]: "
                            "bisect for kl(p || q) = kappa, and return 1 if even p = 1 fits (log(1/q) <= kappa).",
                            atol=1e-6, rtol=1e-6),
    # 04 · DPO's failure cases
    "04.E1": Exercise(_prop41_loss_gap, "The loss only sees the y1:y2 ratio.", atol=1e-9),
    "04.E2": Exercise(lambda: 2 * 0.5 / 0.1, "Lemma 4.1: 2R'/beta.", atol=1e-9),
    "04.E3": Exercise(lambda: 0.0, "Each pair's gradient is +g on the chosen and -g on the rejected logit.", atol=1e-9),
    "04.I1": Implementation(_family_kl, _family_inputs, "pi = ((1-m) p1, (1-m) p2, m) with (p1, p2) pi*'s y1:y2 "
                            "split; pi_ref = ((1-q)/2, (1-q)/2, q); KL = sum pi log(pi / pi_ref).",
                            atol=1e-8, rtol=1e-8),
    # 05 · RPO
    "05.E1": Exercise(lambda: 0.005 * 0.01, "Liu et al.'s loss is L_DPO + eta * beta * (summed NLL).", atol=1e-12,
                      rtol=1e-6),
    "05.E2": Exercise(lambda: math.log(1 + math.exp(-0.5)) + 0.2 * 0.5 * 1.0,
                      "-log s(beta * margin) + eta * beta * (-log pi(y+)), one pair."),
    "05.E3": Exercise(lambda: "linear", "Where is the best response unseen but covered in the linear sense?"),
    "05.I1": Implementation(_rpo, _rpo_inputs, "DPO's loss plus eta * beta * the batch mean of the summed negative "
                            "log-likelihood of the chosen tokens (mask out padding)."),
    # 06 · HyPO
    "06.E1": Exercise(lambda: [-2.0, 2.0], "Each sample's baseline is the mean kl of the other samples.", atol=1e-9),
    "06.E2": Exercise(lambda: 2.0, "The value of the loss is the mean of the samples' kl.", atol=1e-9),
    "06.E3": Exercise(lambda: "hypo", "Which loss has an expectation under pi_theta?"),
    "06.I1": Implementation(_rloo, _kl_inputs, "For each row: kl_i minus the mean of the other k-1 entries."),
    # 07 · the tiny LM lab
    "09.E1": Exercise(_passes_per_process, "Deal the 13 pairs to the 4 processes one by one, cut each shard into "
                      "micro-batches of 3, and remember that a process with fewer pairs still joins every pass."),
    "09.I1": Implementation(_shard_sft, _shard_sft_inputs, "Sum the masked token log-probs of this shard, negate, and "
                            "divide by the global token count, not by this shard's own count.", atol=1e-9, rtol=1e-9),
    "08.E1": Exercise(_mistral_lora_state_gib, "Sum r * (n_in + n_out) over the seven shapes, times 32 layers, times "
                      "16 bytes, divided by 2**30.", atol=0.01),
    "08.I1": Implementation(_padding_fraction, _length_inputs, "1 - sum(lengths) / (len(lengths) * max(lengths)).",
                            atol=1e-9, rtol=0.0),
    "07.E1": Exercise(lambda: -5.0, "+1 for the fruit, -4 for the decoy, -1 for each off-topic word.", atol=1e-9),
    "07.E2": Exercise(_implicit_chosen_reward, "beta times (final - initial) of eval/logps/chosen.", atol=1e-6),
    "07.E3": Exercise(_decoy_winner, "Which loss has a term on the chosen responses, which never contain a decoy?"),
    "07.I1": Implementation(_kl_estimate, _sample_inputs, "Each sample's kl is log pi(y) - log pi_ref(y); the "
                            "estimate of KL(pi || pi_ref) is their mean."),
}
