import os

# No hub here: a failed lookup would cost ~46 s per call. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402  (after the environment is set: these imports may load transformers)

import torch  # noqa: E402

from rpo_lib.tasks import DATA_DIR, load_reference, read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    """The shipped reference policy and its tokenizer (data/gold_task), loaded once per test module."""
    return load_reference()


@pytest.fixture(scope="module")
def pairs():
    """The first 64 preference pairs of data/gold_task/preferences.jsonl."""
    return read_jsonl(DATA_DIR / "preferences.jsonl")[:64]


def _plain_summed_logps(model, rows):
    """log pi(y|x) of right-padded rows (a batch dict or rpo_lib.sample.Samples), summed over completion tokens,
    by a plain log_softmax: independent of rpo_lib.logprobs, for checking it."""
    batch = rows.batch() if hasattr(rows, "batch") else rows
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.fixture
def plain_summed_logps():
    return _plain_summed_logps


def _trl_loss_and_grads(policy, reference, tokenizer, rows, output_dir, *, loss_type, loss_weights=None, beta=0.1,
                        max_length):
    """TRL 1.16 DPOTrainer's loss on ``rows`` as one batch, and the gradient it leaves on each of ``policy``'s
    parameters. Give fresh models: DPOTrainer sets an instance-level ``forward`` on the models it is given
    (trl.trainer.utils.add_fused_lm_head), and a deep copy of such a model would keep calling it."""
    trl = pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[dev]'")
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(output_dir), loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                         per_device_train_batch_size=len(rows), bf16=False, use_cpu=True, report_to=[],
                         max_length=max_length, save_strategy="no")
    theirs = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    batch = next(iter(theirs.get_train_dataloader()))
    theirs.model.train()
    policy.zero_grad()
    loss = theirs.compute_loss(theirs.model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in policy.parameters()]


@pytest.fixture
def trl_loss_and_grads():
    return _trl_loss_and_grads


def _sample_texts():
    from rpo_lib.data import SCHEMAS, load_preferences, sample_file

    texts = []
    for name in SCHEMAS:
        for row in load_preferences(sample_file(name)):
            for key in ("prompt", "chosen", "rejected"):
                value = row[key]
                texts.append(value if isinstance(value, str) else " ".join(m["content"] for m in value))
    return texts


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny model directory as the hub has them, with a tokenizer trained on the sample files."""
    from rpo_lib.models import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", _sample_texts())
