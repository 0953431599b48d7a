import math

import pytest
import torch

from rpo_lib import bt


def test_preference_probability_basics():
    assert bt.preference_probability(1.3, 1.3).item() == pytest.approx(0.5)
    p = bt.preference_probability(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.5]))
    q = bt.preference_probability(torch.tensor([0.0, 0.5]), torch.tensor([2.0, -1.0]))
    assert torch.allclose(p + q, torch.ones(2))
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_bt_loss_by_hand_and_shift_invariance():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    by_hand = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(2.0)))) / 2
    assert bt.bt_loss(chosen, rejected).item() == pytest.approx(by_hand, rel=1e-6)
    assert bt.bt_loss(chosen + 5.0, rejected + 5.0).item() == pytest.approx(by_hand, rel=1e-6)
    assert math.isfinite(bt.bt_loss(torch.tensor([0.0]), torch.tensor([200.0])).item())


def test_bounded_rewards_bound_the_noise():
    assert bt.min_preference_noise(0.0) == pytest.approx(0.5)
    assert bt.min_preference_noise(1.0) == pytest.approx(1 / (1 + math.exp(2.0)))
    rewards = torch.linspace(-1.0, 1.0, 7)
    smallest = bt.preference_probability(rewards[:, None], rewards[None, :]).min().item()
    assert smallest == pytest.approx(bt.min_preference_noise(1.0))
    with pytest.raises(ValueError):
        bt.min_preference_noise(-1.0)


def test_sampled_labels_follow_bt():
    reward_a, reward_b = torch.full((50_000,), 0.8), torch.zeros(50_000)
    wins = bt.sample_labels(reward_a, reward_b, seed=0).double().mean().item()
    expected = 1 / (1 + math.exp(-0.8))
    assert abs(wins - expected) < 4 * math.sqrt(expected * (1 - expected) / 50_000)


def test_sample_comparisons_respects_the_data_distribution_and_seed():
    rewards = torch.tensor([[1.0, 0.0, -1.0, 3.0], [0.0, 0.5, 2.0, -2.0]])
    support = torch.tensor([1.0, 1.0, 1.0, 0.0])  # response 3 is never shown
    data = bt.sample_comparisons(rewards, 2000, response_probs=support, seed=5)
    assert len(data) == 2000
    assert not bool((data.chosen == 3).any() or (data.rejected == 3).any())
    assert bool((data.chosen != data.rejected).all())
    assert set(data.prompt.tolist()) == {0, 1}
    wins = data.pairwise_wins(n_responses=4, n_prompts=2)
    assert wins.sum().item() == 2000 and wins[:, 3, :].sum().item() == 0 and wins[:, :, 3].sum().item() == 0
    assert wins[0, 0, 2] > wins[0, 2, 0]  # reward 1 beats reward -1 more often than the reverse
    again = bt.sample_comparisons(rewards, 2000, response_probs=support, seed=5)
    assert torch.equal(data.chosen, again.chosen) and torch.equal(data.prompt, again.prompt)
    with pytest.raises(ValueError, match="at least two responses"):
        bt.sample_comparisons(rewards, 10, response_probs=torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_tabular_mle_recovers_rewards_up_to_shift_and_improves_with_data():
    truth = torch.tensor([1.5, 0.3, -0.4, -1.0, 0.9]) + 7.0  # the +7 is invisible to BT
    errors = []
    for n_pairs in (300, 30_000):
        data = bt.sample_comparisons(truth, n_pairs, seed=1)
        estimate = bt.fit_tabular_rewards(data, n_responses=5)
        assert estimate.mean().item() == pytest.approx(0.0, abs=1e-9)  # centred
        errors.append(bt.shift_aligned_error(estimate, truth))
    assert errors[1] < 0.05
    assert errors[1] < errors[0] / 3  # ~ 1/sqrt(N): 100x data, ~10x smaller error


def test_tabular_mle_with_prompts_identifies_each_prompt_up_to_its_own_shift():
    truth = torch.tensor([[0.0, 1.0, 2.0], [5.0, 3.0, 4.0]])
    data = bt.sample_comparisons(truth, 20_000, seed=2)
    estimate = bt.fit_tabular_rewards(data, n_responses=3, n_prompts=2)
    assert estimate.shape == (2, 3)
    shift = bt.best_shift(estimate, truth)
    assert torch.allclose(shift, torch.tensor([1.0, 4.0], dtype=torch.float64), atol=0.1)
    assert bt.shift_aligned_error(estimate, truth) < 0.05


def test_linear_mle_recovers_the_weight():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 4, generator=generator)
    w_true = torch.tensor([1.0, -2.0, 0.5, 0.0])
    data = bt.sample_comparisons(features @ w_true, 20_000, seed=4)
    w_hat = bt.fit_linear_rewards(features[data.chosen], features[data.rejected])
    assert torch.allclose(w_hat.float(), w_true, atol=0.1)


def test_fit_errors():
    data = bt.sample_comparisons(torch.zeros(3), 10, seed=0)
    with pytest.raises(ValueError, match="outside n_prompts"):
        bt.fit_tabular_rewards(data, n_responses=2)
    with pytest.raises(ValueError, match="shape \\(N, d\\)"):
        bt.fit_linear_rewards(torch.zeros(3, 2), torch.zeros(3, 3))
