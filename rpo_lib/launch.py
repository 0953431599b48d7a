"""Train on many processes, GPUs or machines: ``rpo_lib.train``'s one loop, started by ``accelerate launch``.

From a notebook::

    from rpo_lib.launch import launch
    result = launch(config, model="HuggingFaceH4/mistral-7b-sft-beta",
                    data="HuggingFaceH4/ultrafeedback_binarized", output_dir="runs/rpo",
                    quantization="nf4", num_processes=4, strategy="fsdp")
    result.history.series("loss")          # the merged history: every metric summed over the processes
    result.adapter_dir                     # the trained adapter, saved once

From a shell (the same options; ``python -m rpo_lib.launch --help`` lists them)::

    python -m rpo_lib.launch --model HuggingFaceH4/mistral-7b-sft-beta \\
        --data HuggingFaceH4/ultrafeedback_binarized --preset qlora_7b --set method=rpo \\
        --quantization nf4 --num-processes 8 --strategy fsdp --output-dir runs/rpo

On several machines run the same command on each, with ``--num-machines``, ``--machine-rank``,
``--main-address`` and ``--main-port`` (docs/scale.md has a SLURM script). ``--num-processes`` counts the
processes of all machines together, as accelerate does.

What happens. The job (model, data, settings) is written to ``<output_dir>/job.json``; ``accelerate launch``
(torchrun underneath: one process per GPU, or per CPU slot with ``--multi_gpu`` and gloo) starts this module
in every process with ``--worker``; each process loads the model onto its own device, tokenizes the data,
and runs ``Trainer.train`` with a ``rpo_lib.parallel.Distributed`` part (its shard of every batch, the
reductions, the DDP or FSDP2 wrapping). The first process writes the checkpoints (whole, so a run resumes on
another number of processes), ``history.json`` and the adapter (``<output_dir>/adapter``).

Faults. A process that raises writes its traceback to ``<output_dir>/errors/rank<r>.txt`` and exits non-zero;
torchrun then stops the others, and ``launch`` raises ``LaunchError`` with the first failure's traceback (or,
for a process killed by a signal, torchrun's report). Checkpoints are written atomically, so the last one survives.

Nothing outlives a launch. torchrun starts every worker in a session of its own, so killing the agent's process
group would miss them: each worker records its pid (``<output_dir>/pids/rank<r>``) and asks the kernel to kill it
when the agent dies. However a launch ends (finished, ``timeout_s``, an exception in the launching process,
Ctrl-C or a notebook's "interrupt kernel"), the launcher sends SIGTERM to the agent, which torchrun forwards to
the workers, waits ``STOP_GRACE_S``, then SIGKILLs the agent's group and every recorded worker and its group
(``tests/test_launch.py`` checks by pid).

Several machines (``num_machines``) may share ``output_dir`` (a cluster's shared file system): each machine's
launcher writes its own ``job.machine<m>.json`` and ``launch.machine<m>.log`` and clears only its own processes'
``errors/`` and ``pids/`` files.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rpo_lib.models import LoraSettings, smollm2
from rpo_lib.parallel import STRATEGIES, Strategy, check_strategy
from rpo_lib.train import History, TrainConfig, preset

SMOLLM2_ALIAS = "smollm2"  # --model smollm2: the small real chat model, from the Hub or converted offline

__all__ = ["Job", "LaunchError", "LaunchResult", "command", "launch", "main", "run_job"]

JOB_FILE = "job.json"
LOG_FILE = "launch.log"
_DEFAULT_LORA = LoraSettings()
STOP_GRACE_S = 10.0  # after SIGTERM, how long the agent and its workers get to exit before they are SIGKILLed
HISTORY_FILE = "history.json"
RESULT_FILE = "result.json"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class Job:
    """Everything a process needs to build and run the training job (it is written to JSON for them).

    Attributes:
        model: a hub id or a local model directory (``rpo_lib.models.load_policy``); ``"smollm2"``:
            SmolLM2-135M-Instruct (``rpo_lib.models.smollm2``).
        data: a dataset id or file (``rpo_lib.data.load_preferences``; for ``method="sft"`` a .jsonl/.json of SFT
            rows), or the rows themselves (a list of dicts, written into the job file).
        config: the ``TrainConfig``; its ``checkpoint_dir`` defaults to ``<output_dir>/checkpoints``.
        output_dir: where the job, logs, errors, checkpoints, history and adapter go.
        strategy: ``"ddp"`` or ``"fsdp"`` (``rpo_lib.parallel``).
        split, schema, limit: passed to ``load_preferences``.
        quantization, lora, sft_adapter, dtype, attn_implementation: passed to ``load_policy`` (``dtype`` by name,
            e.g. ``"bfloat16"``; ``lora=None`` trains every weight).
        resume, overwrite: passed to ``Trainer.train``.
        collective_timeout_s: how long a process waits in a collective for the others before it fails.
    """

    model: str
    data: str | list[dict[str, Any]]
    config: TrainConfig
    output_dir: str
    strategy: Strategy = "ddp"
    split: str | None = None
    schema: str | None = None
    limit: int | None = None
    quantization: str | None = None
    lora: LoraSettings | None = LoraSettings()
    sft_adapter: str | None = None
    dtype: str | None = None
    attn_implementation: str = "sdpa"
    resume: bool = False
    overwrite: bool = False
    collective_timeout_s: float = 1800.0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["config"] = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in out["config"].items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        values = dict(data)
        config = dict(values["config"])
        config["adam_betas"] = tuple(config["adam_betas"])
        values["config"] = TrainConfig(**config)
        if values.get("lora") is not None:
            lora = dict(values["lora"])
            if isinstance(lora["target_modules"], list):
                lora["target_modules"] = tuple(lora["target_modules"])
            values["lora"] = LoraSettings(**lora)
        return cls(**values)


@dataclass
class LaunchResult:
    """What a launch brings back: the merged history, where the adapter and the logs are, how long it took."""

    history: History
    adapter_dir: Path
    output_dir: Path
    log: Path
    seconds: float
    num_processes: int
    strategy: str
    info: dict[str, Any] = field(default_factory=dict)  # the first process's result.json


class LaunchError(RuntimeError):
    """A launch that failed: ``returncode``, the failing ``rank`` (None if unknown), its ``traceback`` text, the
    ``log`` file of the whole launch."""

    def __init__(self, message: str, *, returncode: int, rank: int | None, traceback_text: str, log: Path) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.rank = rank
        self.traceback = traceback_text
        self.log = log


# ------------------------------------------------------------------------------------------- the launcher
def machine_files(num_machines: int = 1, machine_rank: int = 0) -> tuple[str, str]:
    """``(job file, log file)`` names of one machine's launcher: ``job.json`` and ``launch.log`` on one machine,
    ``job.machine<r>.json`` and ``launch.machine<r>.log`` on several, so that machines sharing an output directory
    (a cluster's shared file system) never overwrite each other's."""
    if num_machines == 1:
        return JOB_FILE, LOG_FILE
    return f"job.machine{machine_rank}.json", f"launch.machine{machine_rank}.log"


def machine_ranks(num_processes: int, num_machines: int = 1, machine_rank: int = 0) -> range:
    """The global ranks of the processes one machine runs (torchrun numbers machine by machine)."""
    per_machine = num_processes // num_machines
    return range(machine_rank * per_machine, (machine_rank + 1) * per_machine)


def command(job_file: str | os.PathLike, *, num_processes: int = 1, num_machines: int = 1, machine_rank: int = 0,
            main_address: str | None = None, main_port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command that runs ``job_file`` (what ``launch`` runs; print it to see it)."""
    if num_processes < 1 or num_machines < 1 or num_processes % num_machines:
        raise ValueError(f"num_processes (all machines together) must be a positive multiple of num_machines; got "
                         f"{num_processes} processes on {num_machines} machine(s).")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"machine_rank must lie in [0, {num_machines}); got {machine_rank}.")
    if num_machines > 1 and not main_address:
        raise ValueError("several machines need main_address (the first machine's host name or IP) and a main_port.")
    args = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
            "--num_machines", str(num_machines), "--machine_rank", str(machine_rank), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--max_restarts", "0", "--monitor_interval", "0.5"]
    if num_processes > 1 or num_machines > 1:
        args.append("--multi_gpu")  # the torchrun path, GPUs or not (on a CPU each process uses gloo)
    if main_address:
        args += ["--main_process_ip", main_address]
    if main_port:
        args += ["--main_process_port", str(main_port)]
    return args + ["-m", "rpo_lib.launch", "--worker", os.fspath(job_file)]


def launch(config: TrainConfig, *, model: str | os.PathLike, data: str | os.PathLike | Sequence[Mapping[str, Any]],
           output_dir: str | os.PathLike, num_processes: int = 1, strategy: Strategy = "ddp",
           split: str | None = None, schema: str | None = None, limit: int | None = None,
           quantization: str | None = None, lora: LoraSettings | None = _DEFAULT_LORA,
           sft_adapter: str | os.PathLike | None = None, dtype: str | None = None, attn_implementation: str = "sdpa",
           resume: bool = False, overwrite: bool = False, num_machines: int = 1, machine_rank: int = 0,
           main_address: str | None = None, main_port: int | None = None, timeout_s: float | None = None,
           collective_timeout_s: float = 1800.0, echo: bool = True, env: Mapping[str, str] | None = None,
           stop_grace_s: float = STOP_GRACE_S) -> LaunchResult:
    """Run ``config``'s training job in ``num_processes`` processes and wait for it; see the module docstring.

    Args:
        config: the run's settings; ``batch_size`` is the *global* batch (split across the processes), so the
            same config gives the same run on any number of processes.
        model, data, split, schema, limit, quantization, lora, sft_adapter, dtype, attn_implementation: see ``Job``.
        output_dir: the run's directory (``job.json``, ``launch.log``, ``checkpoints/``, ``history.json``,
            ``adapter/``).
        num_processes: processes of all machines together (one per GPU; on a CPU, one per core you give it).
        strategy: ``"ddp"`` (every GPU holds the model) or ``"fsdp"`` (parameters, gradients and optimizer state
            sharded: FSDP2). ``"deepspeed"`` is refused with a message (see ``rpo_lib.parallel``).
        resume: continue from the newest checkpoint in ``config.checkpoint_dir`` (any number of processes).
        overwrite: delete the checkpoints of an earlier run there first.
        num_machines, machine_rank, main_address, main_port: for several machines (run the same call on each).
        timeout_s: stop the whole launch after this long (``LaunchError``); None: no limit.
        stop_grace_s: when a launch is stopped (timeout, an exception, Ctrl-C), how long its processes get to exit
            after SIGTERM before they are killed (see the module docstring).
        collective_timeout_s: how long a process waits for the others in a collective.
        echo: print the processes' output as it comes (it always goes to ``<output_dir>/launch.log``).
        env: extra environment variables for the processes.

    Raises:
        LaunchError: a process failed (its traceback is in the message), or the launch ran past ``timeout_s``.
    """
    check_strategy(strategy)
    out = Path(output_dir).resolve()
    if config.checkpoint_dir is None:
        config = dataclasses.replace(config, checkpoint_dir=str(out / "checkpoints"))
    rows = data if isinstance(data, (str, os.PathLike)) else [dict(row) for row in data]
    if os.fspath(model) == SMOLLM2_ALIAS and not os.path.exists(SMOLLM2_ALIAS):
        model = smollm2()  # converted once here, not by every process
    job = Job(model=os.fspath(model), data=os.fspath(rows) if isinstance(rows, (str, os.PathLike)) else rows,
              config=config, output_dir=str(out), strategy=strategy, split=split, schema=schema, limit=limit,
              quantization=quantization, lora=lora, sft_adapter=os.fspath(sft_adapter) if sft_adapter else None,
              dtype=dtype, attn_implementation=attn_implementation, resume=resume, overwrite=overwrite,
              collective_timeout_s=collective_timeout_s)
    job_name, log_name = machine_files(num_machines, machine_rank)
    args = command(out / job_name, num_processes=num_processes, num_machines=num_machines,
                   machine_rank=machine_rank, main_address=main_address, main_port=main_port)  # checks the numbers
    out.mkdir(parents=True, exist_ok=True)
    ranks = machine_ranks(num_processes, num_machines, machine_rank)
    # Only this machine's files: on a shared file system the other machines' launchers are writing theirs.
    stale = [out / "errors" / f"rank{r}.txt" for r in ranks] + [out / "pids" / f"rank{r}" for r in ranks]
    if machine_rank == 0:
        stale += [out / HISTORY_FILE, out / RESULT_FILE]
    for path in stale:
        path.unlink(missing_ok=True)
    job_file = out / job_name
    job_file.write_text(json.dumps(job.to_json(), indent=1))
    log = out / log_name
    started = time.perf_counter()
    returncode, survivors = _run(args, log, echo=echo, timeout_s=timeout_s,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
                                      LAUNCHER_PID_VARIABLE: str(os.getpid())},
                                 workers=lambda: _worker_pids(out, ranks, job_file), grace_s=stop_grace_s)
    seconds = time.perf_counter() - started
    if returncode != 0:
        raise _failure(out, log, returncode, timeout_s if returncode == _TIMED_OUT else None, survivors)
    if machine_rank != 0:  # the first machine's first process writes the results
        return LaunchResult(History(), out / ADAPTER_DIR, out, log, seconds, num_processes, strategy)
    history = History(json.loads((out / HISTORY_FILE).read_text()))
    info = json.loads((out / RESULT_FILE).read_text())
    return LaunchResult(history, out / ADAPTER_DIR, out, log, seconds, num_processes, strategy, info)


_TIMED_OUT = -1000
_EXIT_WAIT_S = 60.0  # how long an agent that closed its output gets to exit on its own before it is stopped
LAUNCHER_PID_VARIABLE = "RPO_LAUNCHER_PID"  # tells a worker which process launched it (see _die_with_parent)


def _run(args: list[str], log: Path, *, echo: bool, timeout_s: float | None, env: Mapping[str, str],
         workers: Callable[[], list[int]], grace_s: float = STOP_GRACE_S) -> tuple[int, list[int]]:
    """Run ``args`` (the agent: accelerate, torchrun inside) in a new process group, copying its output to ``log``
    (and the screen); ``(exit status, pids still alive after the shutdown)``.

    However it ends (finished, ``timeout_s``, an exception here, Ctrl-C / a notebook's interrupt), nothing of the
    launch is left running: ``_shutdown`` stops the agent, then kills the workers it started by their pids, which
    the workers record (torchrun starts each in a session of its own, out of reach of the agent's group)."""
    import selectors

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(log, "w") as sink:
        sink.write("$ " + shlex.join(args) + "\n")
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(env),
                                   start_new_session=True)
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        finished = False
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if wait == 0.0:
                    break
                if selector.select(timeout=min(wait, 1.0) if wait is not None else 1.0):
                    chunk = process.stdout.read1(65536)  # type: ignore[attr-defined]
                    if not chunk:  # the agent closed its output: it is ending (not reaped yet: _shutdown does)
                        finished = _wait_exited(process, _EXIT_WAIT_S)
                        break
                    _relay(chunk.decode(errors="replace"), sink, echo)
        finally:
            selector.close()
            survivors = _shutdown(process, workers, grace_s)
    return (process.returncode if finished else _TIMED_OUT), survivors


def _relay(text: str, sink: Any, echo: bool) -> None:
    """Copy the processes' output to the log (and the screen)."""
    sink.write(text)
    sink.flush()
    if echo:
        print(text, end="", flush=True)


def _shutdown(process: subprocess.Popen, workers: Callable[[], list[int]], grace_s: float) -> list[int]:
    """Stop a launch, politely first; return the pids that are still alive after it (none, unless not ours to kill).

    0. Note the agent's descendants (its workers, also those that have not recorded their pids yet).
    1. SIGTERM to the agent, which torchrun forwards to its workers before it exits; ``grace_s`` to do so.
    2. SIGKILL to the agent's process group (the agent, and a single process's worker, which shares its group),
       before the agent is reaped: until then its pid, the group's id, cannot be given to another process.
    3. SIGKILL to every recorded worker and its process group (its own session: torchrun's ``start_new_session``)
       and to every descendant noted in 0, then wait until they are gone. A second Ctrl-C during 1 skips to 2."""
    descendants = _descendants(process.pid)
    if not _exited(process):
        try:
            process.send_signal(signal.SIGTERM)
            _wait_exited(process, grace_s)
        except (KeyboardInterrupt, ProcessLookupError):
            pass
    _kill(process.pid, group=True)
    process.wait()
    pids = workers()
    for pid in pids:
        _kill(pid, group=True)
        _kill(pid, group=False)
    for pid, started in descendants:
        if _start_time(pid) == started:  # still the process noted (a pid is reused only after its process ends)
            _kill(pid, group=False)
            pids.append(pid)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted({pid for pid in pids if _alive(pid)})


def _exited(process: subprocess.Popen) -> bool:
    """Whether the process has ended, without reaping it (a zombie still holds its pid and group id)."""
    if process.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_exited(process: subprocess.Popen, seconds: float) -> bool:
    """Wait up to ``seconds`` for the process to end, without reaping it; whether it ended."""
    deadline = time.monotonic() + seconds
    while not _exited(process):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stat_field(pid: int, index: int) -> int | None:
    """Field ``index`` (counted after the command name: 1 is the parent pid, 19 the start time in clock ticks since
    boot) of /proc/<pid>/stat, or None if the process is gone or there is no /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index])
    except (OSError, IndexError, ValueError):
        return None


def _start_time(pid: int) -> int | None:
    return _stat_field(pid, 19)


def _descendants(pid: int) -> list[tuple[int, int | None]]:
    """``(pid, start time)`` of every descendant of ``pid`` (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        parent = _parent_of(int(entry.name))
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append((child, _start_time(child)))
            frontier.append(child)
    return found


def _kill(pid: int, *, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        try:
            os.kill(pid, 0)  # no /proc (macOS): ask the kernel
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return "\nState:\tZ" not in status


def _worker_pids(out: Path, ranks: range, job_file: Path) -> list[int]:
    """The pids this machine's workers recorded, where that pid still runs this job (a pid is reused after its
    process ends: a process whose command line does not name ``job_file`` is not ours and is left alone)."""
    pids = []
    for rank in ranks:
        try:
            pid = int((out / "pids" / f"rank{rank}").read_text())
        except (FileNotFoundError, ValueError):
            continue
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError:  # no /proc: trust the pid file
            pids.append(pid)
            continue
        if os.fsencode(job_file) in arguments:
            pids.append(pid)
    return pids


def _signalled(log_text: str) -> list[tuple[int, int]]:
    """``(rank, signal)`` of every process torchrun reports killed by a signal other than its own SIGTERM (the
    one it sends to the survivors of a failure)."""
    import re

    found = []
    for rank, code in re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", log_text):
        if int(code) < 0 and int(code) != -signal.SIGTERM:
            found.append((int(rank), -int(code)))
    return sorted(set(found))


def _failure(out: Path, log: Path, returncode: int, timeout_s: float | None,
             survivors: Sequence[int] = ()) -> LaunchError:
    """The error of a failed launch. A process killed by a signal (SIGKILL, the out-of-memory killer) is the cause
    when there is one; otherwise the earliest traceback a process wrote (the others then lost it)."""
    if timeout_s is not None:
        stopped = (f"processes {list(survivors)} could not be killed (not ours to signal?): stop them by hand"
                   if survivors else "it and every worker it started were stopped")
        return LaunchError(f"the launch ran past timeout_s={timeout_s} s; {stopped}. Its output: {log}",
                           returncode=returncode, rank=None, traceback_text="", log=log)
    text = log.read_text(errors="replace")
    reports = []
    for path in (out / "errors").glob("rank*.txt"):
        when, _, trace = path.read_text().partition("\n")
        reports.append((float(when), int(path.stem[4:]), trace))
    killed = _signalled(text)
    if killed:
        rank, number = killed[0]
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        lost = sorted({r for _, r, _ in reports} - {rank})
        then = f" Rank(s) {lost} then failed, having lost it." if lost else ""
        report = "\n".join(text.splitlines()[-25:])
        return LaunchError(f"rank {rank} was killed by signal {number} ({name}) and ended without a Python "
                           f"traceback (killed from outside, or by the out-of-memory killer); exit status "
                           f"{returncode}.{then} The launcher's report:\n{report}\nThe whole output: {log}",
                           returncode=returncode, rank=rank, traceback_text="", log=log)
    if reports:
        _, rank, trace = min(reports)
        others = sorted(r for _, r, _ in reports if r != rank)
        also = f" (then rank(s) {others}, which lost it)" if others else ""
        return LaunchError(f"rank {rank} failed{also}; exit status {returncode}. Its traceback:\n\n{trace}\n"
                           f"The whole output: {log}", returncode=returncode, rank=rank, traceback_text=trace, log=log)
    report = "\n".join(text.splitlines()[-40:])
    return LaunchError(f"the launch failed (exit status {returncode}) before any process wrote a traceback. Its "
                       f"output ends:\n{report}\nThe whole output: {log}", returncode=returncode, rank=None,
                       traceback_text="", log=log)


# ------------------------------------------------------------------------------------- inside a process
def _rows(job: Job) -> Any:
    from rpo_lib.data import load_preferences

    if not isinstance(job.data, str):
        return job.data
    if job.config.method == "sft":
        import datasets

        return datasets.load_dataset("json", data_files=job.data, split="train")
    return load_preferences(job.data, split=job.split, schema=job.schema, limit=job.limit)


def run_job(job: Job) -> None:
    """One process's part of ``job``: set up accelerate, load, train, and (first process) save the results."""
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from rpo_lib.models import load_policy
    from rpo_lib.parallel import Distributed
    from rpo_lib.train import Trainer

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        InitProcessGroupKwargs(timeout=timedelta(seconds=job.collective_timeout_s))])
    parallel = Distributed(accelerator, job.strategy)
    out = Path(job.output_dir)
    torch.manual_seed(job.config.seed)  # every process starts the adapter from the same draw
    dtype = getattr(torch, job.dtype) if job.dtype else None
    model, tokenizer = load_policy(job.model, quantization=job.quantization, lora=job.lora,  # type: ignore[arg-type]
                                   sft_adapter=job.sft_adapter,
                                   gradient_checkpointing=job.config.gradient_checkpointing,
                                   attn_implementation=job.attn_implementation, dtype=dtype, device=parallel.device,
                                   shardable=job.strategy == "fsdp" and parallel.world_size > 1)
    trainer = Trainer(model, tokenizer, _rows(job), job.config, parallel=parallel)
    started = time.perf_counter()
    history = trainer.train(resume=job.resume, overwrite=job.overwrite)
    seconds = time.perf_counter() - started
    trainer.save_model(out / ADAPTER_DIR)
    if parallel.is_main:
        (out / HISTORY_FILE).write_text(json.dumps(list(history)))
        (out / RESULT_FILE).write_text(json.dumps({
            "world_size": parallel.world_size, "strategy": job.strategy, "steps": trainer.step,
            "train_seconds": seconds, "device": str(parallel.device), "examples": len(trainer.examples),
            **parameter_bytes(trainer.model)}))
    parallel.barrier()
    parallel.finish()


def parameter_bytes(model: Any) -> dict[str, int]:
    """Bytes of parameters this process holds (its shards, under FSDP) and how many parameters are sharded."""
    from torch.distributed.tensor import DTensor

    held = sharded = 0
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        held += local.numel() * local.element_size()
        sharded += isinstance(parameter, DTensor)
    return {"parameter_bytes_held": held, "sharded_parameters": sharded}


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this worker when its parent, torchrun's agent, dies, however it dies (even
    by SIGKILL, which the agent cannot forward). If the agent died before this call, the worker has already been
    handed to another parent (init, or a subreaper) and exits now. Elsewhere, nothing (the launcher still kills
    the workers by pid)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    launcher = os.environ.get(LAUNCHER_PID_VARIABLE)
    parent = os.getppid()
    if parent == 1 or (launcher is not None and _parent_of(parent) not in (int(launcher), None)):
        os._exit(1)


def _parent_of(pid: int) -> int | None:
    return _stat_field(pid, 1)


def _worker(job_file: str) -> None:
    """A process's entry: run the job; on an error write the traceback where the launcher looks, and re-raise."""
    _die_with_parent()
    job = Job.from_json(json.loads(Path(job_file).read_text()))
    out = Path(job.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    (out / "pids").mkdir(exist_ok=True)
    (out / "pids" / f"rank{rank}").write_text(str(os.getpid()))
    try:
        run_job(job)
    except BaseException:
        (out / "errors").mkdir(exist_ok=True)
        (out / "errors" / f"rank{rank}.txt").write_text(f"{time.time()}\n{traceback.format_exc()}")
        raise


# ------------------------------------------------------------------------------------------------ the CLI
def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain word: a method, a schedule, a path


def config_from_args(preset_name: str, config_file: str | None, settings: Sequence[str]) -> TrainConfig:
    """A ``TrainConfig`` from a preset, then a JSON file of fields, then ``name=value`` settings."""
    changes: dict[str, Any] = json.loads(Path(config_file).read_text()) if config_file else {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants name=value (e.g. --set beta=0.1); got {item!r}.")
        changes[name.strip()] = _value(text.strip())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise SystemExit(f"no TrainConfig field(s) {unknown}; the fields are {sorted(names)}.")
    if "adam_betas" in changes:
        changes["adam_betas"] = tuple(changes["adam_betas"])
    return preset(preset_name, **changes)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rpo_lib.launch", description=(
        "Train with rpo_lib.train on many processes, GPUs or machines (accelerate launch underneath)."))
    p.add_argument("--model", required=True, help=f"hub id or local directory of the (SFT) model; "
                   f"'{SMOLLM2_ALIAS}': SmolLM2-135M-Instruct (rpo_lib.models.smollm2, works offline)")
    p.add_argument("--data", required=True, help="dataset id or file (see rpo_lib.data.load_preferences)")
    p.add_argument("--output-dir", required=True, help="the run's directory")
    p.add_argument("--preset", default="cpu_chat", help="starting settings: a key of rpo_lib.train.PRESETS")
    p.add_argument("--config", help="a JSON file of TrainConfig fields, applied after the preset")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a TrainConfig field, applied last (repeatable): --set method=rpo --set beta=0.01")
    p.add_argument("--num-processes", type=int, default=1, help="processes of all machines together")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--main-address", help="the first machine's host name or IP (several machines)")
    p.add_argument("--main-port", type=int, help="a free port on the first machine (several machines)")
    p.add_argument("--split")
    p.add_argument("--schema")
    p.add_argument("--limit", type=int)
    p.add_argument("--quantization", choices=["nf4", "int8"], help="default: none")
    p.add_argument("--lora-r", type=int, default=16, help="0: no adapter, train every weight")
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--sft-adapter", help="a saved SFT adapter: the start and the reference")
    p.add_argument("--dtype", help="e.g. bfloat16 (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run's checkpoints first")
    p.add_argument("--timeout", type=float, help="stop the launch after this many seconds")
    p.add_argument("--print-command", action="store_true", help="print the accelerate command and stop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1])
        return 0
    args = parser().parse_args(argv)
    config = config_from_args(args.preset, args.config, args.set)
    options = {"num_processes": args.num_processes, "num_machines": args.num_machines,
               "machine_rank": args.machine_rank, "main_address": args.main_address, "main_port": args.main_port}
    if args.print_command:
        job_name, _ = machine_files(args.num_machines, args.machine_rank)
        print(shlex.join(command(Path(args.output_dir).resolve() / job_name, **options)))
        return 0
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha) if args.lora_r > 0 else None
    try:
        result = launch(config, model=args.model, data=args.data, output_dir=args.output_dir,
                        strategy=args.strategy, split=args.split, schema=args.schema, limit=args.limit,
                        quantization=args.quantization, lora=lora, sft_adapter=args.sft_adapter, dtype=args.dtype,
                        attn_implementation=args.attn_implementation, resume=args.resume, overwrite=args.overwrite,
                        timeout_s=args.timeout, **options)
    except LaunchError as error:
        print(f"\nrpo_lib.launch: {error}", file=sys.stderr)
        return error.returncode if error.returncode > 0 else 1
    if result.history:
        last = result.history[-1]
        print(f"\nrpo_lib.launch: {int(last['step'])} steps on {args.num_processes} process(es) in "
              f"{result.seconds:.0f} s; final loss {last['loss']:.4f}; adapter in {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
