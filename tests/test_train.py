"""rpo_lib.train: exact accumulation, determinism, resume, atomic checkpoints, Ctrl-C, LoRA, TRL parity."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rpo_lib import losses, memory
from rpo_lib.data import load_preferences, sample_file
from rpo_lib.models import load_policy
from rpo_lib.tasks import DATA_DIR, TopicTask, load_reference, reference_corpus
from rpo_lib.train import TrainConfig, Trainer, preset
from rpo_lib.train.batches import lr_factor as _lr_factor
from rpo_lib.train.config import FIELD_RULES


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
    # 3 does not divide 8: micro-batches of 3, 3, 2. HyPO draws the step's samples before the micro-batches, from
    # the same seeded generator, so both runs score the same samples.
    for micro_batch_size in (None, micro):
        config = _config(method=method, micro_batch_size=micro_batch_size, max_grad_norm=None, **changes)
        trainer = Trainer(_perturbed(model), tokenizer, rows, config, ref_model=model)
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
    original = wrong._loss_terms
    wrong._loss_terms = lambda indices, share, count, samples=None: original(indices, 1.0, count, samples)
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
    with pytest.raises(ValueError, match="learning_rate must be > 0.*batch_size must be a whole number"):
        TrainConfig(learning_rate=-1.0, batch_size=2.5)  # every problem at once


def test_every_field_has_a_validation_rule():
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(FIELD_RULES)


def test_every_method_has_one_step_function():
    from rpo_lib.train import METHODS, STEPS

    assert set(STEPS) == set(METHODS) and len(set(STEPS.values())) == len(METHODS)


NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("max_grad_norm", -1.0), ("max_grad_norm", 0.0), ("max_grad_norm", NAN),  # -1 would be gradient ascent
    ("beta", NAN), ("beta", INF), ("beta", 0.0), ("eta", NAN), ("eta", -0.1), ("sft_weight", -1.0),
    ("lam", INF), ("lam", NAN),
    ("learning_rate", NAN), ("learning_rate", INF), ("weight_decay", NAN), ("weight_decay", -1.0),
    ("online_temperature", 0.0), ("online_temperature", -1.0), ("online_temperature", NAN),
    ("batch_size", 2.5), ("batch_size", 0), ("batch_size", True), ("batch_size", "16"),
    ("max_steps", 10.0), ("max_steps", 0), ("warmup_steps", 1.5), ("warmup_steps", -1),
    ("k_online", 2.0), ("online_max_new_tokens", 0), ("max_length", 1), ("max_length", 64.0),
    ("max_prompt_length", 0), ("max_prompt_length", 8.5), ("micro_batch_size", 0), ("micro_batch_size", 1.5),
    ("seed", -1), ("seed", 0.5), ("eval_every", -1), ("save_every", 1.5), ("keep_checkpoints", 0),
    ("precompute_ref_batch_size", 0), ("online_sample_rows", 0), ("adam_betas", (0.9, 1.0)),
    ("adam_betas", (0.9,)), ("adam_betas", (NAN, 0.9)), ("gradient_checkpointing", 1), ("progress", "yes"),
    ("disable_dropout", None), ("precompute_ref_logps", 0), ("logp_reduction", "median"),
    ("lr_schedule", "step"), ("sft_normalization", "mean"), ("checkpoint_dir", 3), ("device", 0),
]


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_every_field_is_checked(name, value):
    with pytest.raises(ValueError, match=f"{name} must"):
        TrainConfig(**{name: value})


def test_relations_between_fields_are_checked():
    with pytest.raises(ValueError, match="max_prompt_length must be below max_length=64"):
        TrainConfig(max_prompt_length=64)
    with pytest.raises(ValueError, match="online_temperature=1"):
        TrainConfig(method="hypo", online_temperature=0.7)  # the online KL would be biased
    TrainConfig(method="dpo", online_temperature=0.7)  # sampling temperature is free for the other methods
    assert TrainConfig(eta=1, beta=1, max_grad_norm=None, micro_batch_size=None).eta == 1  # ints for reals


def test_rpo_coefficient_is_eta_or_sft_weight_never_both():
    with pytest.raises(ValueError, match="give RPO's coefficient once"):
        TrainConfig(method="rpo", eta=0.005, sft_weight=1.0)
    assert TrainConfig(method="rpo", rpo_variant="handbook").rpo_kwargs() == {"normalization": "sum", "eta": 0.005}
    assert TrainConfig(method="rpo", rpo_variant="handbook", eta=0.5).rpo_kwargs()["eta"] == 0.5
    assert TrainConfig(method="rpo", sft_weight=0.3).rpo_kwargs() == {"normalization": "token_mean", "sft_weight": 0.3}
    assert preset("qlora_7b").rpo_kwargs() == {"normalization": "sum", "eta": 0.005}


def test_ipo_uses_mean_token_log_probs_by_default():
    assert TrainConfig(method="ipo").reduction == "mean"  # the IPO authors' form, and TRL's
    assert TrainConfig(method="dpo").reduction == "sum"
    assert TrainConfig(method="ipo", logp_reduction="sum").reduction == "sum"


def test_trainer_reports_dropped_rows(reference, capsys):
    model, tokenizer = reference
    rows = [{"prompt": "fruit:", "chosen": " apple", "rejected": " cat"},
            {"prompt": "fruit:", "chosen": " apple", "rejected": " apple"}]
    trainer = Trainer(copy.deepcopy(model), tokenizer, rows, _config(method="dpo"), ref_model=model)
    assert "kept 1 of 2 pairs; dropped 1 (chosen identical to rejected)" in capsys.readouterr().out
    assert trainer.report.dropped["chosen identical to rejected"] == 1


def test_report_to_writes_tensorboard_events_and_json_lines(reference, pairs, tmp_path):
    """Every logged metric at every step, and the config as hyper-parameters, read back from the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tokenizer = reference
    config = _config(method="rpo", max_steps=3, report_to=("tensorboard", "jsonl"), log_dir=str(tmp_path / "log"))
    history = Trainer(copy.deepcopy(model), tokenizer, pairs, config).train()
    events = EventAccumulator(str(tmp_path / "log"))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    numbers = {key for row in history for key, value in row.items() if key != "step" and isinstance(value, float)}
    assert numbers <= logged and "loss" in logged and "rewards/margins" in logged
    for key in ("loss", "logps/chosen"):
        steps, values = history.series(key)
        read = events.Scalars(key)
        assert [e.step for e in read] == list(steps)
        assert [e.value for e in read] == pytest.approx(list(values), rel=1e-6)
    assert "_hparams_/experiment" in events.summary_metadata  # the config, in the HParams tab
    lines = [json.loads(line) for line in (tmp_path / "log" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["method"] == "rpo" and [row["step"] for row in lines[1:]] == [1, 2, 3]
    assert lines[-1]["loss"] == pytest.approx(history.last("loss"))


def test_evaluating_a_frozen_adapter_needs_no_trainable_parameters(reference, pairs):
    from rpo_lib.chat_task import gold_score
    from rpo_lib.evaluation import compare_to_reference
    from rpo_lib.models import with_lora

    model, tokenizer = reference
    frozen = with_lora(copy.deepcopy(model), r=2).requires_grad_(False)
    prompts = [row["prompt"] for row in pairs[:4]]
    comparison = compare_to_reference(frozen, prompts, gold_score, tokenizer=tokenizer, max_new_tokens=8)
    assert comparison.kl == pytest.approx(0.0, abs=1e-5)  # a new adapter is the identity: pi == pi_ref
    assert comparison.policy_texts == comparison.reference_texts and comparison.win_rate == 0.5


def test_no_trainable_parameters_is_an_error(reference, pairs):
    model, tokenizer = reference
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, tokenizer, pairs, _config(method="dpo"), ref_model=model)


@pytest.mark.parametrize("loss_type, weights, method", [(["sigmoid"], None, "dpo"),
                                                        (["sigmoid", "sft"], [1.0, 0.7], "rpo"),
                                                        (["ipo"], None, "ipo")])
def test_matches_trl_dpo_trainer(pairs, tmp_path, loss_type, weights, method, trl_loss_and_grads):
    """TRL 1.16's DPOTrainer on the same tiny model and batch: the same loss and gradients within 1e-5."""
    # Fresh models, not the shared fixture (see trl_loss_and_grads in conftest.py).
    model, tokenizer = load_reference()
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs[:6]]
    policy = _perturbed(model)
    their_loss, their_grads = trl_loss_and_grads(policy, model, tokenizer, rows, tmp_path, loss_type=loss_type,
                                                 loss_weights=weights, max_length=64)

    ours = Trainer(policy, tokenizer, rows, _config(method=method, beta=0.1, sft_weight=0.7, rpo_variant="trl"),
                   ref_model=model)
    policy.zero_grad()
    our_loss, _ = ours.batch_loss()
    our_loss.backward()
    assert float(our_loss) == pytest.approx(float(their_loss), abs=1e-5)
    for a, b in zip(their_grads, (p.grad for p in policy.parameters()), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def _4bit_and_dense_twin(compute_dtype):
    """The shipped reference loaded in 4-bit NF4 (bitsandbytes, CPU) with compute_dtype, prepared for k-bit
    training, and a dense twin whose linear layers hold the 4-bit weights dequantized: the two models
    differ in how they compute, not in their weights."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=compute_dtype)
    quantized = AutoModelForCausalLM.from_pretrained(DATA_DIR / "reference", quantization_config=quantization,
                                                     device_map="cpu")
    assert quantized.is_loaded_in_4bit
    dense = AutoModelForCausalLM.from_pretrained(DATA_DIR / "reference")
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            if isinstance(module, torch.nn.Linear) and isinstance(layers.get(name), bnb.nn.Linear4bit):
                weight = layers[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float())
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=True), dense.to(compute_dtype)


# Measured on a 2-core AMD EPYC: float32 compute agrees to the last bit; bf16 compute, against a dense bf16
# twin (whose norms and embeddings are bf16 too, where k-bit preparation keeps them float32), differs by up
# to 0.03 nats per sequence and 1.5-2.2% in the gradients. The tolerances leave room for other CPUs.
QLORA_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.1, 0.06)}  # (nats per sequence, grad rel.)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_path_computes_what_the_dense_path_computes(pairs, compute_dtype):
    """preset("qlora_7b")'s code path on the tiny model, 4-bit NF4 + LoRA + gradient checkpointing +
    accumulation, against a dense twin with the same (dequantized) weights and the same LoRA values: the same
    log-probs under pi and pi_ref, the same loss and the same LoRA gradients, within QLORA_TOLERANCES."""
    pytest.importorskip("bitsandbytes")
    from rpo_lib.data import collate_preferences
    from rpo_lib.models import with_lora

    _, tokenizer = load_reference()
    quantized, dense = _4bit_and_dense_twin(compute_dtype)
    policies = {"4-bit": with_lora(quantized, r=4, alpha=8), "dense": with_lora(dense, r=4, alpha=8)}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same adapter in both, away from zero so that every LoRA matrix has a gradient
        adapters = {name: p for name, p in policies["4-bit"].named_parameters() if p.requires_grad}
        for name, p in policies["dense"].named_parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
                adapters[name].copy_(p)
    results = {}
    for label, policy in policies.items():
        config = preset("qlora_7b", batch_size=8, micro_batch_size=3, max_steps=2, max_length=48,
                        max_prompt_length=16, warmup_steps=1, save_every=0, progress=False, device="cpu",
                        gradient_checkpointing=label == "4-bit")
        trainer = Trainer(policy, tokenizer, pairs, config)
        assert trainer.ref_model is None  # pi_ref = the base with the adapter disabled
        batch = collate_preferences(trainer.examples[:8], tokenizer.pad_token_id)
        ref, pol = trainer.logprobs(batch, reference=True), trainer.logprobs(batch)  # eval-mode passes first
        metrics = trainer._optimizer_step(0)  # accumulates over micro-batches of 3, 3, 2
        grads = {name: p.grad.float().clone() for name, p in policy.named_parameters() if p.requires_grad}
        results[label] = (ref, pol, metrics, grads)
    (ref4, pol4, metrics4, grads4), (ref, pol, metrics, grads) = results["4-bit"], results["dense"]
    nats, relative = QLORA_TOLERANCES[compute_dtype]
    torch.testing.assert_close(ref4, ref, rtol=0, atol=nats)
    torch.testing.assert_close(pol4, pol, rtol=0, atol=nats)
    assert metrics4["loss"] == pytest.approx(metrics["loss"], abs=nats / 10)
    error = sum(((grads4[n] - grads[n]) ** 2).sum() for n in grads) ** 0.5
    size = sum((grads[n] ** 2).sum() for n in grads) ** 0.5
    assert error < relative * size, f"LoRA gradients differ by {float(error / size):.2%}"
    assert "loss/sft" in metrics4 and math.isfinite(metrics4["grad_norm"])


def test_4bit_layers_stay_differentiable_after_an_eval_pass():
    """bitsandbytes repacks a 4-bit layer for inference after a no-grad eval forward on AVX512-BF16 CPUs and
    then loses its input gradient; the trainer undoes that (rpo_lib.models.keep_4bit_trainable_on_cpu)."""
    pytest.importorskip("bitsandbytes")
    from rpo_lib.models import keep_4bit_trainable_on_cpu

    quantized, dense = _4bit_and_dense_twin(torch.float32)
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    keep_4bit_trainable_on_cpu(quantized)
    with torch.no_grad():
        quantized.eval()(input_ids=ids)  # what a reference pass or sampling does
    quantized.train()
    grads = []
    for model in (quantized, dense):
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeddings).logits.sum().backward()
        grads.append(embeddings.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ dropout
def _dropout_model(kind, vocab):
    import transformers

    from rpo_lib.models import with_lora

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": vocab}
    torch.manual_seed(0)
    if kind == "gpt2":  # resid/embd/attn_pdrop 0.1 by default: nn.Dropout modules
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                    **ids))
    if kind == "opt":  # OPT keeps its rates as plain floats on the modules (functional dropout)
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, max_position_embeddings=64,
            word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1, **ids))
    if kind == "phi":  # both kinds
        return transformers.PhiForCausalLM(transformers.PhiConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, attention_dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1, **ids))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, attention_dropout=0.1, **ids))
    return with_lora(llama, r=4, alpha=8, dropout=0.1)  # and LoRA's own dropout


@pytest.mark.parametrize("kind", ["gpt2", "opt", "phi", "llama-lora"])
def test_dropout_is_off_so_a_policy_equal_to_pi_ref_scores_zero(reference, pairs, kind):
    from rpo_lib.models import find_dropout

    _, tokenizer = reference
    model = _dropout_model(kind, len(tokenizer))
    assert find_dropout(model)
    ref = None if kind == "llama-lora" else copy.deepcopy(model)  # LoRA: pi_ref is the adapter switched off
    trainer = Trainer(model, tokenizer, pairs, _config(method="hypo", lam=0.5), ref_model=ref)
    assert not find_dropout(trainer.model) and (ref is None or not find_dropout(ref))
    metrics = trainer._optimizer_step(0)  # train mode, pi == pi_ref exactly
    for key in ("kl/online", "rewards/margins", "rewards/accuracies", "rewards/chosen"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_with_dropout_on_the_same_comparison_is_noise(reference, pairs):
    """Why the above matters: leave dropout on and pi == pi_ref no longer scores zero."""
    _, tokenizer = reference
    model = _dropout_model("opt", len(tokenizer))
    trainer = Trainer(model, tokenizer, pairs, _config(method="dpo", disable_dropout=False),
                      ref_model=copy.deepcopy(model))
    assert abs(trainer._optimizer_step(0)["rewards/margins"]) > 1e-4
    with pytest.raises(ValueError, match="HyPO scores its own samples in train mode"):
        Trainer(model, tokenizer, pairs, _config(method="hypo", disable_dropout=False), ref_model=model)


# ---------------------------------------------------------------------------------- what is scored how
def test_hypo_scores_online_samples_by_their_summed_log_probs(reference, pairs, monkeypatch, plain_summed_logps):
    """Whatever logp_reduction says for the pairs, the online KL is of whole responses: sums."""
    model, tokenizer = reference
    trainer = Trainer(_perturbed(model), tokenizer, pairs, _config(method="hypo", logp_reduction="mean"),
                      ref_model=model)
    seen = {}
    draw, online_term = trainer._online_samples, losses.hypo_online_term
    trainer._online_samples = lambda indices, step: seen.setdefault("samples", draw(indices, step))

    def record(logps, ref, lam):
        seen["args"] = (logps, ref)
        return online_term(logps, ref, lam=lam)
    monkeypatch.setattr(losses, "hypo_online_term", record)
    policy_before = copy.deepcopy(trainer.model)
    trainer._optimizer_step(0)
    batch = seen["samples"].batch()
    logps, ref_logps = seen["args"]
    torch.testing.assert_close(logps.detach().flatten(), plain_summed_logps(policy_before, batch), rtol=1e-5,
                               atol=1e-4)
    torch.testing.assert_close(ref_logps.flatten(), plain_summed_logps(model, batch), rtol=1e-5, atol=1e-4)


def test_batches_never_repeat_a_pair_across_an_epoch_boundary(reference, pairs):
    model, tokenizer = reference
    trainer = Trainer(copy.deepcopy(model), tokenizer, pairs[:10], _config(batch_size=4), ref_model=model)
    batches = [trainer._batch_indices(step) for step in range(6)]
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]  # the epoch's last batch is smaller
    for epoch in (batches[:3], batches[3:]):
        seen = [i for batch in epoch for i in batch]
        assert sorted(seen) == list(range(10))  # each pair once per epoch, so never twice in a batch
    assert batches[:3] != batches[3:]  # a new permutation every epoch
    assert [trainer._epoch(step) for step in range(4)] == pytest.approx([0.4, 0.8, 1.0, 1.4])


# ---------------------------------------------------------------------------------- speed on a GPU
class _HostReads(TorchDispatchMode):
    """Counts what would read a GPU tensor back to the host (a synchronisation): .item(), float(), bool(),
    boolean indexing, nonzero, .tolist(). Reads inside the model's own forward and inside the optimizer are
    theirs, not the trainer's, and are not counted (hooks pause the count)."""

    SCALAR_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if not self.paused and (func in self.SCALAR_OPS or boolean_index):
            self.count += 1
        return func(*args, **kwargs)

    def watch(self, trainer, monkeypatch):
        def pause(*args, **kwargs):
            self.paused += 1

        def resume(*args, **kwargs):
            self.paused -= 1

        for model in {id(m): m for m in (trainer.model, trainer.ref_model) if m is not None}.values():
            model.register_forward_pre_hook(pause)
            model.register_forward_hook(resume)
        trainer.optimizer.register_step_pre_hook(pause)
        trainer.optimizer.register_step_post_hook(resume)
        tolist = torch.Tensor.tolist

        def counted_tolist(tensor):
            if not self.paused:
                self.count += 1
            return tolist(tensor)
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "rpo", "hypo"])
def test_one_read_back_per_step_whatever_the_micro_batching(reference, pairs, method, monkeypatch):
    model, tokenizer = reference
    rows = reference_corpus(TopicTask(), 64) if method == "sft" else pairs
    counts = []
    for micro in (8, 4, 2):
        trainer = Trainer(_perturbed(model), tokenizer, rows, _config(method=method, micro_batch_size=micro),
                          ref_model=model)
        trainer._batch_indices(0)  # the epoch's permutation: made on the CPU, once per epoch
        reads = _HostReads()
        reads.watch(trainer, monkeypatch)
        with reads:
            trainer._optimizer_step(0)
        counts.append(reads.count)
        monkeypatch.undo()
    if method != "hypo":
        assert counts == [1, 1, 1]  # the metrics, the checks and the loss, read together
    else:  # plus the sampler: one check per 8 new tokens whether all rows ended, and one read of the tokens
        limit = 1 + _config().online_max_new_tokens // 8 + 1
        assert counts[0] == counts[1] == counts[2] <= limit


def test_precompute_has_its_own_batch_size(reference, pairs):
    model, tokenizer = reference
    for size, passes in ((16, 4), (None, 16)):  # None: 4 x micro_batch_size (1 pair) = 4 pairs per pass
        trainer = Trainer(copy.deepcopy(model), tokenizer, pairs, _config(precompute_ref_logps=True, micro_batch_size=1,
                                                                          precompute_ref_batch_size=size))
        rows: list[int] = []

        def count(module, args, kwargs, rows=rows):
            rows.append(kwargs["input_ids"].shape[0])
        handle = trainer.model.register_forward_pre_hook(count, with_kwargs=True)
        trainer._precompute()
        handle.remove()
        assert len(rows) == passes and rows[0] == 2 * (size or 4)  # chosen and rejected rows
        assert trainer.reference.logps.shape == (64, 2)


def test_training_forwards_ask_for_no_kv_cache(reference, pairs):
    model, tokenizer = reference
    trainer = Trainer(_perturbed(model), tokenizer, pairs, _config(method="rpo"), ref_model=model)
    calls = []
    trainer.model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw.get("use_cache")), with_kwargs=True)
    trainer._optimizer_step(0)
    assert calls and all(value is False for value in calls)


def test_hypo_samples_first_then_frees_the_offline_graph_before_scoring_samples(reference, pairs, monkeypatch):
    """Peak memory: no activations are alive while sampling, and the offline pairs' activations are freed
    (backward) before the online samples are scored with gradients."""
    model, tokenizer = reference
    trainer = Trainer(_perturbed(model), tokenizer, pairs, _config(method="hypo", micro_batch_size=4),
                      ref_model=model)
    events = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kw: events.append("grad forward" if torch.is_grad_enabled() else "no-grad forward"),
        with_kwargs=True)
    backward = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (events.append("backward"),
                                                                           backward(self, *a, **k)))
    trainer._optimizer_step(0)
    first_grad = events.index("grad forward")
    assert "no-grad forward" in events[:first_grad]  # the samples were drawn first ...
    assert "no-grad forward" not in events[first_grad:]  # ... and only then (the reference is another model)
    assert [e for e in events[first_grad:]] == ["grad forward", "backward"] * 4  # 2 micro-batches x 2 terms


# ----------------------------------------------------------------------------------------------------- full fine-tuning
def _moved_share(checkpoint, master_dtype):
    """Share of the weights that one DPO step at lr 5e-7 changes at all, full fine-tuning with bf16 compute."""
    model, tokenizer = load_policy(checkpoint, quantization=None, lora=None, dtype=torch.bfloat16,
                                   master_dtype=master_dtype, gradient_checkpointing=False, device="cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = preset("tiny", method="dpo", learning_rate=5e-7, warmup_steps=0, lr_schedule="constant", batch_size=8,
                    max_length=96, max_grad_norm=None, progress=False)
    trainer = Trainer(model, tokenizer, list(load_preferences(sample_file("ultrafeedback"))), config)
    trainer._optimizer_step(0)
    moved = sum(int((p.detach() != before[name]).sum()) for name, p in trainer.model.named_parameters())
    return moved / sum(p.numel() for p in before.values()), trainer


def test_full_fine_tuning_keeps_float32_master_weights_so_small_steps_move_them(checkpoint):
    """A DPO-sized step (lr 5e-7, the papers' full fine-tuning rate): AdamW moves each weight by about 5e-7, far
    below bf16's resolution (1/256 of a weight of size 0.02: 8e-5) but far above float32's (2e-9). load_policy's
    default for full fine-tuning keeps float32 master weights and computes in bf16 under autocast: nearly every
    weight moves. bf16 weights (master_dtype=bfloat16, what load_policy did before) lose almost every update
    (measured on a GPU: 0.8% against 84.8%)."""
    share, trainer = _moved_share(checkpoint, None)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.compute_dtype == torch.bfloat16 and trainer._autocast
    share_bf16, _ = _moved_share(checkpoint, torch.bfloat16)
    assert share > 0.5 and share_bf16 < 0.05, (share, share_bf16)


def test_the_reference_copy_stores_linear_layers_in_the_compute_dtype_and_scores_the_same(checkpoint):
    """Full fine-tuning's frozen reference: its linear layers in bf16 (autocast casts them anyway), the rest as
    the policy's; before the first step it scores every pair as the policy does."""
    model, tokenizer = load_policy(checkpoint, quantization=None, lora=None, dtype=torch.bfloat16,
                                   gradient_checkpointing=False, device="cpu")
    config = preset("tiny", method="dpo", batch_size=8, max_length=96, progress=False)
    trainer = Trainer(model, tokenizer, list(load_preferences(sample_file("ultrafeedback"))), config)
    reference = trainer.ref_model
    linear = [m.weight for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(w.dtype == torch.bfloat16 for w in linear)
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    batch = trainer.collate(trainer.examples[:8])
    torch.testing.assert_close(trainer.logprobs(batch, reference=True), trainer.logprobs(batch), rtol=0, atol=1e-5)
    held = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert held < 0.8 * sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    plan = memory.plan_memory(model.config, lora_r=None, quantization=None, max_length=96, pairs=8)
    assert plan.parts["reference copy"] == held  # the planner counts the copy the trainer makes, to the byte


# -------------------------------------------------------------------------------------------------------------- batches
def test_length_grouped_batches_cover_every_pair_once_and_pad_less(reference, pairs):
    model, tokenizer = reference
    config = preset("tiny", method="dpo", batch_size=8, progress=False, group_by_length=True)
    grouped = Trainer(model, tokenizer, pairs, config)
    plain = Trainer(model, tokenizer, pairs, preset("tiny", method="dpo", batch_size=8, progress=False))
    steps = len(pairs) // 8
    for trainer in (grouped, plain):
        seen = sorted(i for step in range(steps) for i in trainer._batch_indices(step))
        assert seen == list(range(len(pairs)))

    def padding(trainer):
        total = 0
        for step in range(steps):
            lengths = [len(trainer.examples[i].prompt_ids) + len(trainer.examples[i].chosen_ids)
                       for i in trainer._batch_indices(step)]
            total += max(lengths) * len(lengths) - sum(lengths)
        return total
    assert padding(grouped) < padding(plain)
