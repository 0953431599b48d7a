"""Checkpoints and resume: exact resume, Ctrl-C, safe loading, foreign runs, damaged files, what resume compares."""

import copy
import pathlib

import pytest
import torch

from rpo_lib import checkpoints
from rpo_lib.checkpoints import CheckpointError, checkpoint_files, latest_checkpoint
from rpo_lib.tasks import DATA_DIR, TopicTask, read_jsonl
from rpo_lib.train import Trainer, preset


def _config(**changes):
    return preset("tiny", **{"progress": False, "max_steps": 4, "batch_size": 8, "warmup_steps": 1, **changes})


def _trainer(reference, pairs, **changes):
    model, tokenizer = reference
    return Trainer(copy.deepcopy(model), tokenizer, pairs, _config(**changes), ref_model=model)


def _evaluator(tokenizer):
    return TopicTask().evaluator(tokenizer, samples_per_prompt=2, max_new_tokens=8)


# ---------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("method", ["dpo", "hypo"])
def test_resume_reproduces_the_uninterrupted_run(reference, pairs, method, tmp_path):
    model, tokenizer = reference
    config = _config(method=method, max_steps=8, save_every=3, eval_every=2, checkpoint_dir=str(tmp_path / "a"))
    straight = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model,
                       evaluate=_evaluator(tokenizer))
    history = straight.train()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [  # each with its checksum; rotation took both
        "checkpoint-000006.pt", "checkpoint-000006.pt.sha256", "checkpoint-000008.pt", "checkpoint-000008.pt.sha256"]
    resumed = Trainer(copy.deepcopy(model), tokenizer, pairs, config, ref_model=model,
                      evaluate=_evaluator(tokenizer))
    resumed.train(resume=tmp_path / "a" / "checkpoint-000006.pt")
    assert resumed.history == history
    assert [row["step"] for row in history] == list(range(9))  # row 0: the evaluation before training
    for a, b in zip(straight.parameters, resumed.parameters, strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_names_an_intact_checkpoint_that_exists(reference, pairs, tmp_path, capsys):
    config = dict(method="dpo", max_steps=6, save_every=2, keep_checkpoints=1, checkpoint_dir=str(tmp_path))
    straight = _trainer(reference, pairs, **{**config, "checkpoint_dir": str(tmp_path / "straight")}).train()

    # Interrupt the run while it writes its second checkpoint: torch.save has written part of the file.
    real_save = torch.save
    calls = []

    def save_then_interrupt(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, handle, *args, **kwargs)

    interrupted = _trainer(reference, pairs, **config)
    torch.save = save_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            interrupted.train()
    finally:
        torch.save = real_save
    message = capsys.readouterr().out
    named = pathlib.Path(message.split("The last checkpoint, ")[1].split(", is intact")[0])
    assert named.name == "checkpoint-000002.pt" and named.exists()
    checkpoints.read(named)  # and it reads
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002.pt"  # the .tmp file is not a checkpoint
    resumed = _trainer(reference, pairs, **config)
    assert resumed.train(resume=True) == straight


def test_ctrl_c_never_names_a_checkpoint_that_rotation_deleted(reference, pairs, tmp_path, capsys):
    """Resuming from an older checkpoint while a newer one exists: with keep_checkpoints=1 the rotation keeps the
    newest by step and deletes the file just written. The message names what is there when Ctrl-C comes."""
    config = dict(max_steps=6, save_every=1, keep_checkpoints=3, checkpoint_dir=str(tmp_path))
    _trainer(reference, pairs, **config).train()  # checkpoints 4, 5 and 6
    resumed = _trainer(reference, pairs, **{**config, "keep_checkpoints": 1})
    real_step = resumed._optimizer_step

    def interrupt_at_step_6(step):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(step)

    resumed._optimizer_step = interrupt_at_step_6
    with pytest.raises(KeyboardInterrupt):
        resumed.train(resume=tmp_path / "checkpoint-000004.pt")  # writes 5, then rotation keeps only 6
    message = capsys.readouterr().out
    named = pathlib.Path(message.split("The last checkpoint, ")[1].split(", is intact")[0])
    assert named.exists(), message


def test_cuda_rng_states_are_saved_and_restored(reference, pairs, tmp_path, monkeypatch):
    """Bit-exact resume on a GPU needs the CUDA generators too (faked here: this machine has no GPU)."""
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda new: restored.extend(new))
    trainer = _trainer(reference, pairs, device="cpu", checkpoint_dir=str(tmp_path))
    path = trainer.save_checkpoint()
    saved = checkpoints.read(path)["rng"]["cuda"]
    assert all(torch.equal(a, b) for a, b in zip(saved, states, strict=True))
    _trainer(reference, pairs, device="cpu", checkpoint_dir=str(tmp_path)).load_checkpoint(path)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states, strict=True))


# ----------------------------------------------------------------------------------------- safe loading
class _Payload:
    """Unpickling this runs code: it writes a file (what an attacker's checkpoint could do)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.write_text, (self.target, "this ran")


def test_a_checkpoint_that_would_run_code_is_refused(reference, pairs, tmp_path, capsys):
    trainer = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=2, save_every=1)
    trainer.train()  # checkpoints 1 and 2
    marker = tmp_path / "ran.txt"
    state = torch.load(tmp_path / "checkpoint-000002.pt", weights_only=True)
    state["history"].append(_Payload(marker))
    torch.save(state, tmp_path / "checkpoint-000003.pt")  # the newest file now carries the payload
    checkpoints.write_checksum(tmp_path / "checkpoint-000003.pt")  # and a checksum that matches it
    with pytest.raises(CheckpointError, match="checkpoint-000003.pt: refused by torch.load.weights_only=True."):
        checkpoints.read(tmp_path / "checkpoint-000003.pt")
    resumed = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=2, save_every=1)
    resumed.train(resume=True)
    assert not marker.exists()  # the payload never ran
    out = capsys.readouterr().out
    assert "skipping checkpoint-000003.pt: refused" in out and "Resuming from checkpoint-000002.pt" in out
    assert resumed.step == 2


# ------------------------------------------------------------------------------------ foreign runs
def test_checkpoints_are_found_by_step_not_by_name(tmp_path):
    for step in (999_999, 1_000_000, 7):
        (tmp_path / checkpoints.checkpoint_name(step)).write_bytes(b"x")
    (tmp_path / "checkpoint-2000000.pt.tmp").write_bytes(b"x")
    (tmp_path / "notes.pt").write_bytes(b"x")
    assert [step for step, _ in checkpoint_files(tmp_path)] == [7, 999_999, 1_000_000]
    assert latest_checkpoint(tmp_path).name == "checkpoint-1000000.pt"  # sorts before 999999 as text
    checkpoints.rotate(tmp_path, 1)
    assert [p.name for _, p in checkpoint_files(tmp_path)] == ["checkpoint-1000000.pt"]


def test_a_new_run_refuses_a_directory_with_another_runs_checkpoints(reference, pairs, tmp_path):
    old = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=6, save_every=3, learning_rate=5e-3)
    old.train()
    before = sorted(p.name for p in tmp_path.iterdir())
    new = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=4, save_every=2)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints .*resume=True.*overwrite=True"):
        new.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing was touched
    with pytest.raises(ValueError, match="learning_rate: 0.005 in the checkpoint, 0.001 now"):
        new.train(resume=True)  # the old run is not silently continued either
    history = new.train(overwrite=True)
    assert [p.name for _, p in checkpoint_files(tmp_path)] == ["checkpoint-000002.pt", "checkpoint-000004.pt"]
    assert len(history) == 4
    again = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=4, save_every=2)
    again.load_checkpoint(True)  # what is there now is this run's
    assert again.step == 4


# ------------------------------------------------------------------------------ what resume compares
@pytest.mark.parametrize("change, expected", [
    ({"learning_rate": 2e-3}, "learning_rate: 0.001 in the checkpoint, 0.002 now"),
    ({"weight_decay": 0.1}, "weight_decay: 0.0 in the checkpoint, 0.1 now"),
    ({"beta": 0.5}, "beta: 0.1 in the checkpoint, 0.5 now"),
    ({"method": "rpo"}, "method: 'dpo' in the checkpoint, 'rpo' now"),
    ({"seed": 3}, "seed: 0 in the checkpoint, 3 now"),
    ({"lr_schedule": "linear"}, "lr_schedule: 'cosine' in the checkpoint, 'linear' now"),
])
def test_resume_refuses_changed_settings(reference, pairs, tmp_path, change, expected):
    _trainer(reference, pairs, checkpoint_dir=str(tmp_path)).train()
    other = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), **change)
    before = [p.clone() for p in other.parameters]
    with pytest.raises(ValueError, match=expected):
        other.train(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters, strict=True))  # nothing loaded


def test_resume_lists_every_difference_and_checks_the_data(reference, pairs, tmp_path):
    _trainer(reference, pairs, checkpoint_dir=str(tmp_path), precompute_ref_logps=True).train()
    model, tokenizer = reference
    other_rows = read_jsonl(DATA_DIR / "preferences.jsonl")[64:128]  # new rows, same count
    other = Trainer(copy.deepcopy(model), tokenizer, other_rows,
                    _config(checkpoint_dir=str(tmp_path), precompute_ref_logps=True, learning_rate=3e-3, lam=0.2),
                    ref_model=model)
    with pytest.raises(ValueError) as error:
        other.train(resume=True)
    message = str(error.value)
    for part in ("learning_rate: 0.001", "lam: 0.05", "the data: the tokenized rows differ"):
        assert part in message
    assert other.reference.logps is None  # the old rows' reference log-probs were not taken over


def test_resume_may_change_how_a_step_is_computed_and_the_length(reference, pairs, tmp_path, capsys):
    _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=4).train()
    longer = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=6, micro_batch_size=4,
                      save_every=1, progress=False)
    history = longer.train(resume=True)
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert "max_steps=4; this one has 6" in capsys.readouterr().out


def test_a_deeper_model_fails_before_any_weight_is_loaded(reference, pairs, tmp_path):
    from rpo_lib.tasks import reference_model
    model, tokenizer = reference
    _trainer(reference, pairs, checkpoint_dir=str(tmp_path)).train()
    deeper = reference_model(tokenizer, num_hidden_layers=3)
    trainer = Trainer(deeper, tokenizer, pairs, _config(checkpoint_dir=str(tmp_path)), ref_model=model)
    before = {name: p.clone() for name, p in deeper.named_parameters()}
    with pytest.raises(ValueError, match=r"the model: \d+ of this model's trainable tensor\(s\) are absent"):
        trainer.train(resume=True)
    assert all(torch.equal(p, before[name]) for name, p in deeper.named_parameters())


# ------------------------------------------------------------------------------------ damaged files
def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint at all\n" * 20)
    else:  # a torch file that is not a checkpoint, with a checksum that matches it
        torch.save({"weights": torch.zeros(2)}, path)
        checkpoints.write_checksum(path)


@pytest.mark.parametrize("how, problem", [("truncated", "truncated or damaged"), ("empty", "the file is empty"),
                                          ("garbage", "truncated or damaged"),
                                          ("foreign", "not an rpo_lib checkpoint")])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_newest_intact_one(reference, pairs, tmp_path, capsys,
                                                                             how, problem):
    straight = _trainer(reference, pairs, checkpoint_dir=str(tmp_path / "straight"), max_steps=4, save_every=2)
    expected = straight.train()
    config = dict(checkpoint_dir=str(tmp_path / "run"), max_steps=4, save_every=2)
    _trainer(reference, pairs, **config).train()
    newest = tmp_path / "run" / "checkpoint-000004.pt"
    _damage(newest, how)
    with pytest.raises(CheckpointError, match=f"checkpoint-000004.pt: .*{problem}"):
        checkpoints.read(newest)
    resumed = _trainer(reference, pairs, **config)
    history = resumed.train(resume=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint-000004.pt: " in out and "Resuming from checkpoint-000002.pt" in out
    assert history == expected  # steps 3 and 4 redone, exactly


def test_an_explicit_damaged_file_and_a_directory_of_them_are_clear_errors(reference, pairs, tmp_path):
    _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=2, save_every=1).train()
    for path in tmp_path.glob("checkpoint-*.pt"):
        _damage(path, "truncated")
    trainer = _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=2)
    with pytest.raises(CheckpointError, match="checkpoint-000001.pt: truncated or damaged"):
        trainer.train(resume=tmp_path / "checkpoint-000001.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in it can be read: .*000002.*000001"):
        trainer.train(resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        _trainer(reference, pairs, checkpoint_dir=str(tmp_path / "none")).train(resume=True)


def test_resume_and_overwrite_together_is_an_error(reference, pairs, tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        _trainer(reference, pairs, checkpoint_dir=str(tmp_path)).train(resume=True, overwrite=True)


@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
def test_one_flipped_byte_is_caught_by_the_checksum_and_resume_falls_back(reference, pairs, tmp_path, capsys, where):
    """A bad disk or a partial copy changes a byte: before checksums, such a file loaded without a word (3 of 3
    positions) and training went on from corrupted state. Now it is refused like a truncated file."""
    straight = _trainer(reference, pairs, checkpoint_dir=str(tmp_path / "straight"), max_steps=4, save_every=2)
    expected = straight.train()
    config = dict(checkpoint_dir=str(tmp_path / "run"), max_steps=4, save_every=2)
    _trainer(reference, pairs, **config).train()
    newest = tmp_path / "run" / "checkpoint-000004.pt"
    data = bytearray(newest.read_bytes())
    data[int(where * len(data))] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checkpoint-000004.pt: truncated or damaged: its bytes do not match"):
        checkpoints.read(newest)
    resumed = _trainer(reference, pairs, **config)
    history = resumed.train(resume=True)
    out = capsys.readouterr().out
    assert "skipping checkpoint-000004.pt: " in out and "Resuming from checkpoint-000002.pt" in out
    assert history == expected


def test_garbage_of_any_kind_is_a_checkpoint_error_never_a_raw_one(tmp_path):
    """Random bytes make torch's unpickler and zip reader raise IndexError, KeyError, UnicodeDecodeError, ...:
    each is reported as a damaged file (by the checksum, and without one by the loader), so the fallback to an intact
    checkpoint works for all of them."""
    import random

    rng = random.Random(0)
    state = {"format": checkpoints.FORMAT, "weights": {"a": torch.arange(600.0)}}
    path = tmp_path / "checkpoint-000001.pt"
    checkpoints.write_atomic(state, path)
    valid = path.read_bytes()
    samples = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))) for _ in range(60)]
    for position in range(0, len(valid), max(1, len(valid) // 60)):  # one byte flipped anywhere in a torch file
        flipped = bytearray(valid)
        flipped[position] ^= 0xFF
        samples.append(bytes(flipped))
    for data in samples:
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="checkpoint-000001.pt: truncated or damaged"):
            checkpoints.read(path)  # the checksum catches it before anything is unpickled
        with pytest.raises(CheckpointError, match="checkpoint-000001.pt: "):
            checkpoints.read(path, verify=False)  # without one (a file from before checksums): the unpickler's errors


def test_a_checkpoint_without_its_checksum_is_refused_until_given_one(reference, pairs, tmp_path):
    _trainer(reference, pairs, checkpoint_dir=str(tmp_path), max_steps=2, save_every=2).train()
    path = tmp_path / "checkpoint-000002.pt"
    record = checkpoints.checksum_path(path)
    assert record.read_text().split() == [checkpoints.file_sha256(path), path.name]  # sha256sum -c reads it
    record.unlink()
    with pytest.raises(CheckpointError, match="no checksum file .*write_checksum"):
        checkpoints.read(path)
    assert checkpoints.read(path, verify=False)["step"] == 2  # for a file written before checksums
    checkpoints.write_checksum(path)
    assert checkpoints.read(path)["step"] == 2


def test_rotation_and_overwrite_remove_the_checksums_too(tmp_path):
    for step in (1, 2, 3):
        state = {"format": checkpoints.FORMAT, "step": step}
        checkpoints.write_atomic(state, tmp_path / checkpoints.checkpoint_name(step))
    (tmp_path / "checkpoint-000004.pt.sha256.tmp").write_text("x")  # a write cut short
    (tmp_path / "checkpoint-000005.pt.sha256").write_text("x")  # cut short between the two renames
    checkpoints.rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000003.pt", "checkpoint-000003.pt.sha256",
                                                          "checkpoint-000004.pt.sha256.tmp"]
    checkpoints.remove_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []
