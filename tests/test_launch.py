"""rpo_lib.launch and rpo_lib.parallel: N processes compute what one process computes, resume across process
counts, and fail cleanly. Real launches: ``accelerate launch --multi_gpu`` with 2 CPU processes on gloo, the
same code path as on GPUs. Each launch takes about 8-10 s on a 2-core CPU (two interpreters importing torch).

Tolerances. Two processes add the same numbers in another order (a gradient all-reduce, a sum of metrics), so
results agree to rounding, not bitwise: metrics to a relative 1e-5 or an absolute 1e-5 (measured: 1e-7 relative;
HyPO's online KL, a difference of summed log-probs of size 10-20, differs by 1.1e-6), adapter weights to
5e-6 absolute after 4 AdamW steps at learning rate 5e-3 (measured: at most 3.5e-7, on weights of size 0.1;
AdamW divides by the gradients' root mean square, which carries rounding differences of small gradients into
the update).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rpo_lib import checkpoints
from rpo_lib.parallel import shard
from rpo_lib.train import preset

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / "data" / "samples" / "ultrafeedback_binarized.jsonl"
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-5
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, 5e-6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from rpo_lib.data import load_preferences
    from rpo_lib.models import tiny_checkpoint

    rows = list(load_preferences(DATA))
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny", [json.dumps(r) for r in rows])


def _config(method: str, **changes):
    # batch 5 of 11-12 pairs: shards of 3 and 2 (one process runs a stand-in pass), and epoch-end batches of 2
    # and 1 (a process with no pair of its own).
    base = {"method": method, "batch_size": 5, "micro_batch_size": 2, "max_steps": 4, "max_length": 96,
            "warmup_steps": 0, "lr_schedule": "constant", "learning_rate": 5e-3, "progress": False,
            "k_online": 2, "online_max_new_tokens": 8}
    if method == "rpo":
        base.update(rpo_variant="trl", sft_weight=1.0)  # the token-mean SFT term: its normalisation is global
    return preset("tiny", **{**base, **changes})


CASES = {  # method -> (config changes, rows)
    "dpo": ({"precompute_ref_logps": True}, 11),  # the reference table scored in blocks and gathered
    "rpo": ({}, None),
    "hypo": ({}, None),
    "qlora": ({"method": "rpo"}, None),  # NF4 weights (bitsandbytes on the CPU) + LoRA
    "int8": ({"method": "rpo"}, None),  # LLM.int8() weights + LoRA: kept whole under FSDP (their scales)
}
QUANTIZATION = {"qlora": "nf4", "int8": "int8"}

_runs: dict[tuple, object] = {}


def _launch(tiny_model, tmp_path_factory, method, processes, strategy, **changes):
    from rpo_lib.launch import launch

    key = (method, processes, strategy, tuple(sorted(changes.items())))
    if key not in _runs:
        extra, limit = CASES[method]
        out = tmp_path_factory.mktemp(f"{method}-{processes}-{strategy}")
        settings = {**extra, **changes}
        _runs[key] = launch(_config(settings.pop("method", method), **settings), model=tiny_model, data=DATA,
                            limit=limit, output_dir=out, num_processes=processes, strategy=strategy,
                            lora=_lora(), quantization=QUANTIZATION.get(method), echo=False,
                            timeout_s=300)
    return _runs[key]


def _lora():
    from rpo_lib.models import LoraSettings

    return LoraSettings(r=4, alpha=8)


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _assert_same_run(one, two):
    assert [row["step"] for row in one.history] == [row["step"] for row in two.history]
    for key in sorted(set(one.history[0]) - {"step", "lr", "epoch"}):
        a, b = one.history.series(key)[1], two.history.series(key)[1]
        assert a == pytest.approx(b, rel=LOSS_RTOL, abs=LOSS_ATOL), key
    weights_one, weights_two = _adapter(one.adapter_dir), _adapter(two.adapter_dir)
    assert set(weights_one) == set(weights_two) and weights_one
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


def test_shards_are_disjoint_and_cover_the_batch():
    batch = [7, 3, 9, 1, 4]
    shards = [shard(batch, rank, 2) for rank in range(2)]
    assert shards == [([7, 9, 4], 0), ([3, 1, 7], 1)]  # rank 1 is topped up with a stand-in (weight 0)
    real = [indices[:len(indices) - stand_ins] for indices, stand_ins in shards]
    assert sorted(real[0] + real[1]) == sorted(batch) and not set(real[0]) & set(real[1])
    assert shard([5], 1, 3) == ([5], 1)  # a process with no pair of its own still runs one (stand-in) pass


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_as_one(tiny_model, tmp_path_factory, method, strategy):
    """Same global batch, same loss trajectory, metrics and final adapter, within the tolerances above."""
    one = _launch(tiny_model, tmp_path_factory, method, 1, "ddp")
    two = _launch(tiny_model, tmp_path_factory, method, 2, strategy)
    assert one.info["world_size"] == 1 and two.info["world_size"] == 2
    assert len(one.history) == 4 and one.history.last("loss") != one.history.series("loss")[1][0]  # it trained
    _assert_same_run(one, two)
    if strategy == "fsdp" and method == "int8":  # the rest sharded, the 8-bit weights (~22% here) whole on each
        assert two.info["sharded_parameters"] > 0
        assert 0.55 * one.info["parameter_bytes_held"] < two.info["parameter_bytes_held"] < 0.7 * one.info[
            "parameter_bytes_held"]
    elif strategy == "fsdp":  # every parameter sharded (4-bit weights too: float storage), each holds half
        assert two.info["sharded_parameters"] > 0
        assert two.info["parameter_bytes_held"] < 0.6 * one.info["parameter_bytes_held"]
    else:
        assert two.info["sharded_parameters"] == 0


@pytest.mark.parametrize("method", ["dpo", "rpo", "hypo"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_padding_free_batches_on_two_processes_train_as_on_one(tiny_model, tmp_path_factory, method, strategy):
    """Packed rows are scored through the wrapped model (DDP's hooks, FSDP's all-gathers), so padding-free training
    on 2 processes gives the one-process run; before the fix it crashed under both."""
    one = _launch(tiny_model, tmp_path_factory, method, 1, "ddp", padding_free=True)
    two = _launch(tiny_model, tmp_path_factory, method, 2, strategy, padding_free=True)
    assert len(two.history) == 4 and two.info["world_size"] == 2
    _assert_same_run(one, two)


def _resume(tiny_model, tmp_path, method, first, second, strategy):
    """``first`` processes train 2 steps, ``second`` processes resume to 4 steps in the same directory."""
    from rpo_lib.launch import launch

    extra, limit = CASES[method]
    for processes, steps, resume in ((first, 2, False), (second, 4, True)):
        result = launch(_config(method, max_steps=steps, **extra), model=tiny_model, data=DATA, limit=limit,
                        output_dir=tmp_path, num_processes=processes, strategy=strategy, lora=_lora(),
                        resume=resume, echo=False, timeout_s=300)
    assert result.info["world_size"] == second
    return result


@pytest.mark.parametrize(("first", "second", "strategy"), [(2, 1, "fsdp"), (1, 2, "ddp")])
def test_resume_with_another_number_of_processes(tiny_model, tmp_path_factory, tmp_path, first, second, strategy):
    """Checkpoints hold whole tensors (gathered from FSDP's shards), so a run resumes on any process count and
    ends where the uninterrupted one-process run ends."""
    resumed = _resume(tiny_model, tmp_path, "rpo", first, second, strategy)
    steps = [step for step, _ in checkpoints.checkpoint_files(tmp_path / "checkpoints")]
    assert steps == [2, 4]  # written once per save (by the first process), the first run's kept
    _assert_same_run(_launch(tiny_model, tmp_path_factory, "rpo", 1, "ddp"), resumed)


# ----------------------------------------------------------------------------------------------- faults
FAULT_HOOK = '''
import os
if os.environ.get("RANK") == os.environ.get("RPO_TEST_FAULT_RANK"):
    import signal
    import time
    import rpo_lib.train as train

    step_once = train.Trainer._optimizer_step

    def faulty(self, step):
        if step == int(os.environ["RPO_TEST_FAULT_STEP"]):
            if os.environ["RPO_TEST_FAULT"] == "raise":
                raise RuntimeError("injected fault on this rank")
            if os.environ["RPO_TEST_FAULT"] == "hang":  # a stuck process: deaf to SIGTERM (the other waits for it)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print("RPO_TEST_HANGING", flush=True)
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)
        return step_once(self, step)

    train.Trainer._optimizer_step = faulty
'''


def _fault_env(tmp_path, fault, step=2):
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)  # imported by every process at start-up
    return {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
            "RPO_TEST_FAULT": fault, "RPO_TEST_FAULT_RANK": "1", "RPO_TEST_FAULT_STEP": str(step)}


def _recorded_pids(out: Path, expected: int = 2) -> list[int]:
    pids = [int(p.read_text()) for p in (out / "pids").glob("rank*")]
    assert len(pids) == expected, f"{len(pids)} worker pids recorded, expected {expected}"
    return pids


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


@pytest.mark.parametrize("fault", ["raise", "sigkill"])
def test_a_failing_rank_stops_the_launch_cleanly(tiny_model, tmp_path, fault):
    """Rank 1 fails in step 3, after the checkpoint of step 2: the launch exits non-zero long before a hang would
    end, names the rank (with its traceback when it raised), leaves no process behind, and the checkpoint is
    intact."""
    import rpo_lib.launch
    from rpo_lib.launch import launch

    env = _fault_env(tmp_path, fault)
    out = tmp_path / "run"
    started = time.monotonic()
    with pytest.raises(rpo_lib.launch.LaunchError) as caught:
        launch(_config("dpo", save_every=2), model=tiny_model, data=DATA, output_dir=out, num_processes=2,
               lora=_lora(), echo=False, env=env, timeout_s=300)
    elapsed = time.monotonic() - started
    error = caught.value
    assert error.returncode != 0
    # Not a speed: a hang would last until timeout_s (300 s, and then error.rank would be None) or the collective
    # timeout (1800 s); a clean failure takes about 10 s here. The bound leaves a busy machine 18 times that.
    assert elapsed < 180, f"the launch took {elapsed:.0f} s to fail: the processes did not stop on the fault"
    assert error.rank == 1, str(error)
    if fault == "raise":
        assert "injected fault on this rank" in error.traceback and "Traceback" in str(error)
    else:
        assert "killed by signal 9 (SIGKILL)" in str(error) and "without a Python traceback" in str(error)
    pids = _recorded_pids(out)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a process of the failed launch is still running"
    path, state, skipped = checkpoints.newest_readable(out / "checkpoints")
    assert state["step"] == 2 and not skipped and path.name == checkpoints.checkpoint_name(2)


def _checkpoint_copies(rank, world_size, init_file, model_dir, out):
    """One process of a 2-process FSDP full fine-tuning run (gloo, no launcher): one step, then what the
    checkpoint's state holds in this process."""
    from types import SimpleNamespace

    from rpo_lib.data import load_preferences
    from rpo_lib.models import load_policy
    from rpo_lib.parallel import Distributed
    from rpo_lib.train import Trainer

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        accelerator = SimpleNamespace(process_index=rank, num_processes=world_size, device="cpu",
                                      end_training=lambda: None)
        model, tokenizer = load_policy(model_dir, quantization=None, lora=None, gradient_checkpointing=False,
                                       device="cpu")
        trainer = Trainer(model, tokenizer, list(load_preferences(DATA)), _config("dpo"),
                          parallel=Distributed(accelerator, "fsdp"))
        trainer._optimizer_step(0)
        weights, optimizer = trainer._trainable_state(), trainer._optimizer_state()
        values = list(weights.values()) + [v for entry in optimizer["state"].values() for k, v in entry.items()
                                           if k != "step"]
        sharded = sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "copied": sum(isinstance(v, torch.Tensor) for v in values), "none": sum(v is None for v in values),
            "sharded": sharded, "whole": all(list(v.shape) == list(p.shape) for v, p in zip(
                weights.values(), [p for p in model.parameters() if p.requires_grad], strict=True)
                if isinstance(v, torch.Tensor))}))
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_full_fine_tuning_checkpoints_are_gathered_into_the_first_process_only(tiny_model, tmp_path):
    """Every process takes part in the gathers, but only the first copies the whole weights and AdamW moments into
    host memory (before, every process did: 16 bytes per parameter per GPU, in host memory)."""
    import torch.multiprocessing as mp

    mp.spawn(_checkpoint_copies, args=(2, str(tmp_path / "init"), tiny_model, str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert first["sharded"] > 0 and second["sharded"] > 0  # FSDP sharded the weights
    assert first["copied"] > 0 and first["none"] == 0 and first["whole"]
    assert second["copied"] == 0 and second["none"] == first["copied"]


# ------------------------------------------------------------------------------- nothing left running
# Rank 1 hangs in step 1, deaf to SIGTERM, and rank 0 waits for it in a collective: what a stuck GPU job looks like.
# Before the fix the workers, each in a session of its own, outlived the launcher's process group.
def _hanging_launch(tiny_model, out, tmp_path, **options):
    from rpo_lib.launch import launch

    return launch(_config("dpo", max_steps=50), model=tiny_model, data=DATA, output_dir=out, num_processes=2,
                  lora=_lora(), echo=False, env=_fault_env(tmp_path, "hang", step=1), stop_grace_s=3,
                  **options)


def _assert_none_alive(pids, out=None):
    alive = [pid for pid in pids if _alive(pid)]
    assert not alive, f"worker(s) {alive} of the stopped launch are still running"
    if out is not None:  # nor any process at all of this launch, recorded or not (its job file is in their command)
        job = str(out / "job.json").encode()
        running = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if job in entry.joinpath("cmdline").read_bytes() and _alive(int(entry.name)):
                    running.append(int(entry.name))
            except OSError:
                continue
        assert not running, f"processes {running} of the stopped launch are still running"


def test_a_timeout_leaves_no_process_running(tiny_model, tmp_path):
    import rpo_lib.launch

    out = tmp_path / "run"
    with pytest.raises(rpo_lib.launch.LaunchError, match="ran past timeout_s") as caught:
        _hanging_launch(tiny_model, out, tmp_path, timeout_s=40)  # start-up takes ~10 s; then both are stuck
    assert "every worker it started were stopped" in str(caught.value)
    _assert_none_alive(_recorded_pids(out), out)  # checked as launch returns: it waits until they are gone


def test_a_timeout_during_start_up_leaves_no_process_running(tiny_model, tmp_path):
    """Stopped while the workers still import torch, before they record their pids or tie themselves to the agent:
    the launcher noted the agent's children before it stopped it."""
    import rpo_lib.launch

    out = tmp_path / "run"
    with pytest.raises(rpo_lib.launch.LaunchError, match="ran past timeout_s"):
        _hanging_launch(tiny_model, out, tmp_path, timeout_s=6)
    _assert_none_alive([], out)


def test_an_exception_in_the_launching_process_leaves_no_process_running(tiny_model, tmp_path, monkeypatch):
    import rpo_lib.launch as launch_module

    relay = launch_module._relay

    def failing(text, sink, echo):  # the launcher fails while the workers are stuck (a full disk, a bug, ...)
        relay(text, sink, echo)
        if "RPO_TEST_HANGING" in text:
            raise OSError("injected failure in the launching process")

    monkeypatch.setattr(launch_module, "_relay", failing)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="injected failure"):
        _hanging_launch(tiny_model, out, tmp_path, timeout_s=300)
    _assert_none_alive(_recorded_pids(out), out)


def test_ctrl_c_in_the_launching_process_leaves_no_process_running(tiny_model, tmp_path):
    """SIGINT to the process that called launch (a terminal's Ctrl-C, a notebook's "interrupt kernel")."""
    out = tmp_path / "run"
    script = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent)]!r}\n"
              f"from pathlib import Path\nimport test_launch as t\n"
              f"t._hanging_launch({tiny_model!r}, Path({str(out)!r}), Path({str(tmp_path)!r}), timeout_s=300)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        log = out / "launch.log"
        while not (log.exists() and "RPO_TEST_HANGING" in log.read_text(errors="replace")):
            assert launcher.poll() is None, launcher.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the launch did not reach its hang"
            time.sleep(0.2)
        pids = _recorded_pids(out)
        launcher.send_signal(signal.SIGINT)
        output = launcher.communicate(timeout=120)[0].decode()
    finally:
        launcher.kill()
    assert launcher.returncode != 0 and "KeyboardInterrupt" in output, output[-3000:]
    _assert_none_alive(pids, out)


def test_two_machines_sharing_an_output_directory_keep_their_own_files(tiny_model, tmp_path_factory, tmp_path):
    """Two launchers with num_machines=2 on one host and one shared output directory: each writes its own job file
    and log and clears only its own processes' files, and the run trains as one machine's 2 processes do."""
    import socket
    import threading

    from rpo_lib.launch import launch

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "shared"
    planted = [out / "errors" / "rank5.txt", out / "pids" / "rank7"]  # files of ranks neither machine runs
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("another launch's")
    options = {"model": tiny_model, "data": DATA, "output_dir": out, "num_processes": 2, "num_machines": 2,
               "main_address": "127.0.0.1", "main_port": port, "lora": _lora(), "echo": False, "timeout_s": 300}
    results: dict[int, object] = {}

    def machine(rank):
        try:
            results[rank] = launch(_config("rpo"), machine_rank=rank, **options)
        except BaseException as error:  # noqa: BLE001  (reported below)
            results[rank] = error

    second = threading.Thread(target=machine, args=(1,))
    second.start()
    machine(0)
    second.join(timeout=400)
    assert not isinstance(results[0], BaseException), results[0]
    assert not isinstance(results[1], BaseException), results[1]
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert {"job.machine0.json", "job.machine1.json", "launch.machine0.log", "launch.machine1.log"} <= set(names)
    assert "job.json" not in names and "launch.log" not in names
    assert sorted(p.name for p in (out / "pids").iterdir()) == ["rank0", "rank1", "rank7"]  # each its own rank
    assert all(path.read_text() == "another launch's" for path in planted)  # nobody cleared what is not theirs
    for rank in (0, 1):
        assert json.loads((out / f"job.machine{rank}.json").read_text())["output_dir"] == str(out.resolve())
    _assert_same_run(_launch(tiny_model, tmp_path_factory, "rpo", 2, "ddp"), results[0])


# ------------------------------------------------------------------------------------------ the interfaces
def test_the_command_line_runs_a_launch(tiny_model, tmp_path):
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "rpo_lib.launch", "--model", tiny_model, "--data", str(DATA), "--output-dir",
            str(out), "--num-processes", "2", "--strategy", "fsdp", "--lora-r", "4", "--lora-alpha", "8",
            "--preset", "tiny", "--set", "method=rpo", "--set", "max_steps=2", "--set", "batch_size=4",
            "--set", "max_length=96", "--set", "progress=False", "--timeout", "300"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 steps on 2 process(es)" in done.stdout
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert (out / "adapter" / "adapter_config.json").exists()


def test_the_command_line_prints_accelerates_command_for_several_machines(tmp_path):
    args = [sys.executable, "-m", "rpo_lib.launch", "--model", "m", "--data", "d", "--output-dir", str(tmp_path),
            "--num-processes", "16", "--num-machines", "2", "--machine-rank", "1", "--main-address", "node-0",
            "--main-port", "29500", "--print-command"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split()
    for flag, value in [("--num_processes", "16"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "node-0"), ("--main_process_port", "29500")]:
        assert printed[printed.index(flag) + 1] == value
    assert "--multi_gpu" in printed
    assert printed[-4:] == ["-m", "rpo_lib.launch", "--worker", str(tmp_path.resolve() / "job.machine1.json")]


def test_settings_and_mistakes_are_reported():
    import rpo_lib.launch as launch_module
    from rpo_lib.launch import command, config_from_args

    config = config_from_args("tiny", None, ["method=hypo", "beta=0.2", "adam_betas=(0.8, 0.9)"])
    assert (config.method, config.beta, config.adam_betas) == ("hypo", 0.2, (0.8, 0.9))
    with pytest.raises(SystemExit, match="no TrainConfig field"):
        config_from_args("tiny", None, ["betta=0.2"])
    with pytest.raises(ValueError, match="main_address"):
        command("job.json", num_processes=4, num_machines=2)
    with pytest.raises(ValueError, match="multiple of num_machines"):
        command("job.json", num_processes=3, num_machines=2, main_address="a")
    with pytest.raises(NotImplementedError, match="strategy='fsdp'"):
        launch_module.launch(preset("tiny"), model="m", data="d", output_dir="unused", strategy="deepspeed")
    assert not callable(launch_module)  # a plain module: the function is rpo_lib.launch.launch
