"""``diffenc train --nproc N``: one training as N processes on this machine, through torchrun's own agent.

The agent (``torch.distributed.launcher``, what ``torchrun`` runs) starts N ranks of ``python -m
flows.cli train`` reading one resolved params file, watches them, and stops them all when one fails or
when this process gets SIGTERM/SIGINT (each rank then finishes its step and rank 0 checkpoints). The
ranks print no outcome of their own: this side turns the job's end into the entry point's result or one
exception (the failed rank's message, from its torchrun error file). Rank 0 appends every history row
to an events file (one JSON line each) that a thread here follows to feed the caller's
``on_log``/``on_validate``; an exception from them (a pruner's StopTraining) is written to a stop-request
file the ranks' stop hook reads, and raised once they have stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffenc_core import data, distributed, runs, runstart, trainer
from diffenc_core.config import Config, dump
from diffenc_core.errors import SIGNAL_EXIT_BASE, DiffencError, JobError, signal_exit
from diffenc_core.interrupt import STOP_SIGNALS, Interrupted

FOLLOW_S = 0.5  # how often the events file is read for the caller's on_log / on_validate
EVENTS_ENV = "DIFFENC_EVENTS"  # rank 0 appends each history row here (JSON lines)
STOP_ENV = "DIFFENC_STOP_REQUEST"  # this file's presence asks the ranks to stop (its text is the reason)
SHUTDOWN_TIMEOUT_S = 60
"""After SIGTERM, the ranks get this long to finish their step and checkpoint before the agent kills them."""
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the agent's own handlers, put back afterwards
INTERRUPT_EXITS = frozenset(signal_exit(s) for s in STOP_SIGNALS)
VAL_PREFIX = "val_"
log = logging.getLogger(__name__)  # the history columns a validation adds: what on_validate gets


def train(
    cfg: Config,
    start: runstart.Start,
    progress: bool = True,
    on_log: trainer.Callback | None = None,
    on_validate: trainer.Callback | None = None,
    live_dir: str | Path | None = None,
) -> Path:
    """Train ``cfg`` with ``train.nproc`` processes; returns the run directory and raises what
    ``trainer.train`` would (a DiffencError, Interrupted, StopTraining), or a JobError when a rank died."""
    plan = runstart.plan(cfg, start)  # refusals, missing data and devices: one line before any process starts
    data.read_manifest(cfg.data.prepared_dir)
    trainer.device_for(cfg)
    if plan.message:
        log.info(plan.message)  # the start line, as flows.entry logs it for one process
    with tempfile.TemporaryDirectory(prefix="diffenc-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        dump(cfg, params)
        args = ["-m", "flows.cli", "train", "--params", str(params), "--progress" if progress else "--no-progress"]
        args += {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(start, [])
        if live_dir is not None:
            args += ["--live", str(live_dir)]
        events, request = Path(tmp) / "events.jsonl", Path(tmp) / "stop-request"
        events.touch()
        follower = _Follower(events, request, on_log, on_validate)
        try:
            failures, signum = _run_agent(cfg, args, Path(tmp), events, request)
        finally:
            follower.stop()
    return _outcome(plan.run_dir, failures, signum, follower.error)


def report_row(step: int, row: dict[str, Any]) -> None:
    """Rank 0 of a ``diffenc train --nproc`` job: append a history row to the launcher's events file."""
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **row}, default=float) + "\n")


def stop_request_file() -> Path | None:
    """The file whose presence asks this rank's job to stop (set by the launcher), if any."""
    path = os.environ.get(STOP_ENV)
    return Path(path) if path else None


def _run_agent(cfg: Config, args: list[str], tmp: Path, events: Path,
               request: Path) -> tuple[dict[int, Any], int | None]:
    """Run the job to its end: the failed ranks (rank → ProcessFailure), and the signal that stopped
    this process, if one did."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    options: dict[str, Any] = dict(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.train.nproc, run_id=f"diffenc-{uuid.uuid4().hex}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=str(tmp / "logs")),
    )
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        options["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    with _rank_env(cfg, events, request), _quiet_agent(), _own_signal_handlers():
        try:
            elastic_launch(LaunchConfig(**options), sys.executable)(*args)
        except ChildFailedError as err:
            return dict(err.failures), None
        except SignalException as err:
            return {}, int(err.sigval)
    return {}, None


def _outcome(run_dir: Path, failures: dict[int, Any], signum: int | None, callback_error: BaseException | None) -> Path:
    """The run directory of a job that ended well, else the exception that says how it ended."""
    run = runs.Run(run_dir)
    status = run.status()
    if signum is None and failures and all(f.exitcode in INTERRUPT_EXITS for f in failures.values()):
        signum = failures[min(failures)].exitcode - SIGNAL_EXIT_BASE
    if signum is not None:
        raise Interrupted(signum, int(status.get("steps") or 0), run.path, (run.checkpoint_dir / "last.pt").exists())
    if failures:
        message = _failure_message(failures)
        if status.get("state") == "running":  # rank 0 died before it could record how the run ended
            with contextlib.suppress(OSError, DiffencError):
                run.set_status("failed", error=message)
        name, _, text = message.partition(": ")
        cls = distributed.error_class(name)
        if cls is not None:
            raise cls(text)
        raise JobError(text if name == JobError.__name__ else message)
    if callback_error is not None:
        raise callback_error
    state = status.get("state")
    if state == "stopped":
        raise trainer.StopTraining(status.get("reason") or "stopped on request")
    if state != "done":
        raise JobError(f"{run.path}: its processes ended, but the run is '{state or 'unknown'}'")
    return run.path


def _failure_message(failures: dict[int, Any]) -> str:
    """One line for a failed job: a rank killed from outside (not by the agent's SIGTERM) first, then
    the message the reporting rank recorded, else how the first failed rank ended."""
    killed = [(rank, f) for rank, f in sorted(failures.items()) if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    if killed:
        rank, f = killed[0]
        return f"{JobError.__name__}: rank {rank} (pid {f.pid}) was killed by {f.signal_name()}"
    for _, f in sorted(failures.items()):
        recorded = f.error_file_data.get("message") if isinstance(f.error_file_data, dict) else None
        if isinstance(recorded, dict):
            recorded = recorded.get("message")
        if recorded:
            return str(recorded)
    rank, f = min(failures.items())
    return f"{JobError.__name__}: rank {rank} (pid {f.pid}) exited with status {f.exitcode}"


@contextlib.contextmanager
def _rank_env(cfg: Config, events: Path, request: Path) -> Iterator[None]:
    """The environment the ranks inherit: launched by diffenc (they stay quiet), never a Prefect flow
    run of their own, the events and stop-request files, and the configured torch threads."""
    values = {distributed.LAUNCHED_ENV: "1", "DIFFENC_PREFECT": "0", EVENTS_ENV: str(events), STOP_ENV: str(request)}
    if cfg.train.threads > 0:
        values["OMP_NUM_THREADS"] = str(cfg.train.threads)
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _AgentLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(AGENT_LOGGERS)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """Keep the agent's own log lines (workers started, SIGTERM sent, the failure table) out of the
    output: the job's outcome is reported once, by this process's caller."""
    quiet = _AgentLines()
    handlers: set[logging.Handler] = set()
    for name in AGENT_LOGGERS:  # every handler a record of theirs reaches
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None:
            handlers.update(logger.handlers)
            logger = logger.parent if logger.propagate else None
    if logging.lastResort is not None:
        handlers.add(logging.lastResort)
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """The agent takes SIGTERM, SIGINT, SIGHUP and SIGQUIT over (to stop its ranks); give them back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for name in AGENT_SIGNALS if (sig := getattr(signal, name, None))}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _Follower:
    """Calls ``on_log``/``on_validate`` for each row rank 0 appends to the events file, from a thread.

    A callback's exception asks the ranks to stop (the stop-request file, read by their stop hook) and is
    kept in ``error``.
    """

    def __init__(self, events: Path, request: Path, on_log: trainer.Callback | None,
                 on_validate: trainer.Callback | None):
        self.events, self.request = events, request
        self.offset = 0
        self.on_log, self.on_validate = on_log, on_validate
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if on_log is not None or on_validate is not None:
            self.thread = threading.Thread(target=self._follow, name="diffenc-follow", daemon=True)
            self.thread.start()

    def _follow(self) -> None:
        while not self.done.wait(FOLLOW_S):
            self.poll()

    def poll(self) -> None:
        if self.error is not None:
            return
        with open(self.events, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        try:
            for line in complete.decode().splitlines():
                row = json.loads(line)
                step = int(row["step"])
                if self.on_log is not None:
                    self.on_log(step, row)
                val = {k: v for k, v in row.items() if k.startswith(VAL_PREFIX)}
                if val and self.on_validate is not None:
                    self.on_validate(step, val)
        except BaseException as err:  # handed to the caller once the ranks have stopped
            self.error = err
            with contextlib.suppress(OSError):
                runs.atomic_write_text(self.request, str(err) or type(err).__name__)

    def stop(self) -> None:
        """Stop following, after delivering the rows written last."""
        if self.thread is None:
            return
        self.done.set()
        self.thread.join()
        self.poll()
