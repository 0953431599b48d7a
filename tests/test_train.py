"""rpo_lib.train: exact accumulation, determinism, resume, atomic checkpoints, Ctrl-C, LoRA, TRL parity."""

import copy
import math

import pytest
import torch

from rpo_lib import train as train_module
from rpo_lib.tasks import DATA_DIR, TopicTask, load_reference, read_jsonl, reference_corpus
from rpo_lib.train import Trainer, TrainConfig, _lr_factor, latest_checkpoint, preset


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture(scope="module")
def pairs():
    return read_jsonl(DATA_DIR / "preferences.jsonl")[:64]


def _perturbed(model, seed=0):
    """A policy that differs from pi_ref, so the losses and gradients are not at their symmetric point."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy.train().requires_grad_(True)


def _config(**changes):
    return preset("tiny", **{"progress": False, "max_steps": 4, "batch_size": 8, "warmup_steps": 1, **changes})


def _per_prompt_sampler(trainer):
    """HyPO's samples drawn per prompt with their own seed: the same whatever the micro-batching."""
    real = trainer.sample

    def sample(prompts, **kwargs):
        from rpo_lib.sample import Samples
        parts = [real([p], **{**kwargs, "generator": torch.Generator().manual_seed(hash(tuple(p)) % 2**31)})
                 for p in prompts]
        width = max(s.input_ids.shape[1] for s in parts)

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
        return Samples(torch.cat([pad(s.input_ids, 0) for s in parts]),
                       torch.cat([pad(s.attention_mask, 0) for s in parts]),
                       torch.cat([pad(s.completion_mask, 0) for s in parts]),
                       [c for s in parts for c in s.completion_ids], torch.arange(len(prompts)).repeat_interleave(
                           kwargs["k"]), torch.cat([s.finished for s in parts]), kwargs["k"])
    trainer.sample = sample


ACCUMULATION_CASES = [
    ("sft", {}),
    ("sft", {"sft_normalization": "seq_mean"}),
    ("dpo", {}),
    ("ipo", {}),
    ("rpo", {"rpo_variant": "trl"}),  # token mean: needs the batch's token count
    ("rpo", {"rpo_variant": "openrlhf"}),
    ("rpo", {"rpo_variant": "handbook", "logp_reduction": "mean"}),
    ("hypo", {"lam": 0.5}),
]


@pytest.mark.parametrize("method, changes", ACCUMULATION_CASES)
@pytest.mark.parametrize("micro", [2, 3])
def test_accumulated_gradient_equals_full_batch(reference, pairs, method, changes, micro):
    model, tokenizer = reference
    rows = reference_corpus(TopicTask(), 64) if method == "sft" else pairs
    grads = []
    for micro_batch_size in (None, micro):  # 3 does not divide 8: micro-batches of 3, 3, 2
        config = _config(method=method, micro_batch_size=micro_batch_size, max_grad_norm=None, **changes)
        trainer = Trainer(_perturbed(model), tokenizer, rows, config, ref_model=model)
        if method == "hypo":
            _per_prompt_sampler(trainer)
        metrics = trainer._optimizer_step(0)
        grads.append(([p.grad.clone() for p in trainer.parameters], metrics))
    (full, full_metrics), (accumulated, acc_metrics) = grads
    for a, b in zip(full, accumulated, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert acc_metrics["loss"] == pytest.approx(full_metrics["loss"], rel=1e-5)
    if "rewards/margins" in full_metrics:
        assert acc_metrics["rewards/margins"] == pytest.approx(full_metrics["rewards/margins"], rel=1e-4, abs=1e-6)


def test_wrong_weighting_would_be_caught(reference, pairs):
    """The accumulation test can fail: summing (not averaging) micro-batch losses changes the gradient."""
    model, tokenizer = reference
    full = Trainer(_perturbed(model), tokenizer, pairs, _config(method="dpo", max_grad_norm=None), ref_model=model)
    full._optimizer_step(0)
    wrong = Trainer(_perturbed(model), tokenizer, pairs, _config(method="dpo", max_grad_norm=None,
                                                                micro_batch_size=2), ref_model=model)
    original = wrong._micro_loss
    wrong._micro_loss = lambda indices, share, count: original(indices, 1.0, count)  # no share weighting
    wrong._optimizer_step(0)
    assert not torch.allclose(full.parameters[0].grad, wrong.parameters[0].grad, rtol=1e-3)


@pytest.mark.parametrize("method", ["dpo", "rpo", "hypo"])
def test_same_seed_same_run(reference, pairs, method):
    model, tokenizer = reference
    runs = []
    for _ in range(2):
        trainer = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(method=method, max_steps=5), ref_model=model)
        runs.append((trainer.train(), trainer.parameters))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)
    other = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(method=method, max_steps=5, seed=1),
                    ref_model=model).train()
    assert other != runs[0][0]


def _evaluator(tokenizer):
    return TopicTask().evaluator(tokenizer, samples_per_prompt=2, max_new_tokens=8)


@pytest.mark.parametrize("method", ["dpo", "hypo"])
def test_resume_reproduces_the_uninterrupted_run(reference, pairs, method, tmp_path):
    model, tokenizer = reference
    config = _config(method=method, max_steps=8, save_every=3, eval_every=2, checkpoint_dir=str(tmp_path / "a"))
    straight = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model,
                       evaluate=_evaluator(tokenizer))
    history = straight.train()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint-000006.pt", "checkpoint-000008.pt"]
    resumed = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model,
                      evaluate=_evaluator(tokenizer))
    resumed.train(resume=tmp_path / "a" / "checkpoint-000006.pt")
    assert resumed.history == history
    assert [row["step"] for row in history] == list(range(9))  # row 0: the evaluation before training
    for a, b in zip(straight.parameters, resumed.parameters, strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_leaves_the_last_checkpoint_usable(reference, pairs, tmp_path, capsys):
    model, tokenizer = reference
    config = _config(method="dpo", max_steps=6, save_every=2, checkpoint_dir=str(tmp_path))
    straight = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model).train()

    # Interrupt the run while it writes its second checkpoint: torch.save has written part of the file.
    real_save = torch.save
    calls = []

    def save_then_interrupt(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, handle, *args, **kwargs)

    for old in tmp_path.iterdir():
        old.unlink()
    interrupted = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model)
    torch_save = train_module.torch.save
    train_module.torch.save = save_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupted.train()
    finally:
        train_module.torch.save = torch_save
    assert "checkpoint-000002.pt, is intact" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002.pt"  # the .tmp file is not a checkpoint
    resumed = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model)
    assert resumed.train(resume=True) == straight


def test_resume_checks(reference, pairs, tmp_path):
    model, tokenizer = reference
    trainer = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(method="dpo", checkpoint_dir=str(tmp_path)),
                      ref_model=model)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.train(resume=True)
    trainer.train()
    other = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(method="rpo", checkpoint_dir=str(tmp_path)),
                    ref_model=model)
    with pytest.raises(ValueError, match="method='dpo'"):
        other.train(resume=True)


def test_precomputed_reference_logps_give_the_same_run(reference, pairs):
    model, tokenizer = reference
    live = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(method="dpo"), ref_model=model).train()
    trainer = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(method="dpo", precompute_ref_logps=True))
    assert trainer.ref_model is None  # no frozen copy needed
    precomputed = trainer.train()
    for a, b in zip(live, precomputed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)


def test_lora_reference_is_the_base_with_the_adapter_disabled(reference, pairs):
    from rpo_lib.models import with_lora
    model, tokenizer = reference
    policy = with_lora(copy.deepcopy(model), r=4, alpha=8)
    base = {name: p.clone() for name, p in policy.named_parameters() if not p.requires_grad}
    trainer = Trainer(policy, tokenizer, pairs, _config(method="hypo", max_steps=3))
    assert trainer.ref_model is None
    loss, metrics = trainer.batch_loss(range(8))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)  # a new adapter is the identity: pi = pi_ref
    assert metrics["kl/online"] == pytest.approx(0.0, abs=1e-6)
    history = trainer.train()
    assert history[-1]["rewards/margins"] != 0
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[name]), name  # only the adapter trained


def test_learning_rate_schedule():
    config = TrainConfig(warmup_steps=4, max_steps=14, lr_schedule="cosine")
    assert [_lr_factor(s, config) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert _lr_factor(4, config) == pytest.approx(1.0)
    assert _lr_factor(9, config) == pytest.approx(0.5)
    assert _lr_factor(14, config) == pytest.approx(0.0)
    linear = TrainConfig(warmup_steps=0, max_steps=10, lr_schedule="linear")
    assert _lr_factor(5, linear) == pytest.approx(0.5)


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="ppo")
    with pytest.raises(ValueError, match="rpo_variant must be one of"):
        TrainConfig(rpo_variant="mine")
    with pytest.raises(ValueError, match="k_online >= 2"):
        TrainConfig(method="hypo", k_online=1)
    with pytest.raises(ValueError, match=r"micro_batch_size must lie in \[1, batch_size=16\]"):
        TrainConfig(micro_batch_size=32)
    with pytest.raises(ValueError, match="no preset 'huge'"):
        preset("huge")
    assert preset("qlora_7b").rpo_variant == "handbook"


def test_trainer_reports_dropped_rows(reference, capsys):
    model, tokenizer = reference
    rows = [{"prompt": "fruit:", "chosen": " apple", "rejected": " cat"},
            {"prompt": "fruit:", "chosen": " apple", "rejected": " apple"}]
    trainer = Trainer(copy.deepcopy(model), tokenizer, rows, _config(method="dpo"), ref_model=model)
    assert "kept 1 of 2 pairs; dropped 1 (chosen identical to rejected)" in capsys.readouterr().out
    assert trainer.report.dropped["chosen identical to rejected"] == 1


def test_no_trainable_parameters_is_an_error(reference, pairs):
    model, tokenizer = reference
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, tokenizer, pairs, _config(method="dpo"), ref_model=model)


@pytest.mark.parametrize("loss_type, weights, method", [(["sigmoid"], None, "dpo"),
                                                        (["sigmoid", "sft"], [1.0, 0.7], "rpo")])
def test_matches_trl_dpo_trainer(pairs, tmp_path, loss_type, weights, method):
    """TRL 1.16's DPOTrainer on the same tiny model and batch: the same loss and gradients within 1e-5."""
    trl = pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[dev]'")
    from datasets import Dataset

    # Fresh models, not the shared fixture: DPOTrainer sets an instance-level `forward` on the models it is
    # given (trl.trainer.utils.add_fused_lm_head), and a deep copy of such a model would keep calling it.
    model, tokenizer = load_reference()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs[:6]]
    policy = _perturbed(model)
    args = trl.DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, loss_weights=weights, beta=0.1,
                         per_device_train_batch_size=6, bf16=False, use_cpu=True, report_to=[], max_length=64,
                         save_strategy="no")
    theirs = trl.DPOTrainer(model=policy, ref_model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    batch = next(iter(theirs.get_train_dataloader()))
    theirs.model.train()
    policy.zero_grad()
    their_loss = theirs.compute_loss(theirs.model, batch)
    their_loss.backward()
    their_grads = [p.grad.clone() for p in policy.parameters()]

    ours = Trainer(policy, tokenizer, rows, _config(method=method, beta=0.1, eta=0.7, rpo_variant="trl"),
                   ref_model=model)
    policy.zero_grad()
    our_loss, _ = ours.batch_loss()
    our_loss.backward()
    assert float(our_loss) == pytest.approx(float(their_loss), abs=1e-5)
    for a, b in zip(their_grads, (p.grad for p in policy.parameters()), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_qlora_preset_trains_a_4bit_model_with_lora(pairs):
    """The 7B recipe's code path on the tiny model: 4-bit NF4 weights (bitsandbytes, CPU), a LoRA adapter,
    gradient checkpointing, accumulation, and the handbook RPO variant of preset("qlora_7b")."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from rpo_lib.models import with_lora

    _, tokenizer = load_reference()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(DATA_DIR / "reference", quantization_config=quantization,
                                                 device_map="cpu")
    assert model.is_loaded_in_4bit
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    policy = with_lora(model, r=4, alpha=8)
    config = preset("qlora_7b", max_steps=3, batch_size=4, micro_batch_size=2, max_length=48, max_prompt_length=16,
                    warmup_steps=1, save_every=0, progress=False, device="cpu")
    trainer = Trainer(policy, tokenizer, pairs, config)
    assert trainer.ref_model is None  # pi_ref = the 4-bit base with the adapter disabled
    from rpo_lib.data import collate_preferences
    batch = collate_preferences(trainer.examples[:8], tokenizer.pad_token_id)
    ref_before, policy_before = trainer.logprobs(batch, reference=True), trainer.logprobs(batch)
    torch.testing.assert_close(policy_before, ref_before)  # a new adapter is the identity
    history = trainer.train()
    assert all(math.isfinite(row["loss"]) for row in history) and history[-1]["rewards/margins"] != 0
    assert "loss/sft" in history[-1]
    # Only the adapter trained: pi_ref (bitsandbytes may repack the 4-bit storage, so compare what it computes).
    torch.testing.assert_close(trainer.logprobs(batch, reference=True), ref_before)
    assert not torch.allclose(trainer.logprobs(batch), policy_before)
