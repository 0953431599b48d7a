"""rpo_lib.evaluation: the tiny reward model that stands in for a real one offline."""

import torch


def test_tiny_reward_model_is_tiny_and_scores(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    from rpo_lib.evaluation import (
        load_reward_model,
        reward_scores,
        tiny_reward_checkpoint,
    )

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reward = load_reward_model(tiny_reward_checkpoint(tmp_path / "reward", tokenizer), device="cpu")
    assert sum(p.numel() for p in reward.model.parameters()) < 100_000
    scores = reward_scores(reward, ["why is the sky blue", "a prime number"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
