"""``diffenc train --nproc N``: one training as N processes on this machine, through torchrun's own agent.

The agent (``torch.distributed.launcher``, what ``torchrun`` runs) starts N ranks of ``python -m
flows.cli train`` reading one resolved params file, watches them, and stops them all when one fails or
when this process gets SIGTERM/SIGINT (each rank then finishes its step and rank 0 checkpoints). The
ranks print no outcome of their own: this side turns the job's end into the entry point's result or one
exception (the failed rank's message, from its torchrun error file), and feeds the caller's
``on_log``/``on_validate`` from the run's history while it trains; an exception from them (a pruner's
StopTraining) asks the ranks to stop through the run's stop-request file, and is raised once they have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffenc_core import data, distributed, runs, runstart, trainer
from diffenc_core.config import Config, dump
from diffenc_core.errors import DiffencError, JobError
from diffenc_core.interrupt import SIGNAL_EXIT_BASE, STOP_SIGNALS, Interrupted

FOLLOW_S = 1.0  # how often the run's history is read for the caller's on_log / on_validate
SHUTDOWN_TIMEOUT_S = 60
"""After SIGTERM, the ranks get this long to finish their step and checkpoint before the agent kills them."""
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the agent's own handlers, put back afterwards
INTERRUPT_EXITS = frozenset(SIGNAL_EXIT_BASE + s for s in STOP_SIGNALS)
VAL_PREFIX = "val_"  # the history columns a validation adds: what on_validate gets


def train(
    cfg: Config,
    start: runstart.Start,
    progress: bool = True,
    on_log: trainer.Callback | None = None,
    on_validate: trainer.Callback | None = None,
    live_dir: str | Path | None = None,
    say: Any = None,
) -> Path:
    """Train ``cfg`` with ``train.nproc`` processes; returns the run directory and raises what
    ``trainer.train`` would (a DiffencError, Interrupted, StopTraining), or a JobError when a rank died."""
    plan = runstart.plan(cfg, start)  # refusals, missing data and devices: one line before any process starts
    data.read_manifest(cfg.data.prepared_dir)
    trainer.device_for(cfg)
    if say is not None and plan.message:
        say(plan.message)
    with tempfile.TemporaryDirectory(prefix="diffenc-launch-") as tmp:
        params = Path(tmp) / "params.yaml"
        dump(cfg, params)
        args = ["-m", "flows.cli", "train", "--params", str(params), "--progress" if progress else "--no-progress"]
        args += {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(start, [])
        if live_dir is not None:
            args += ["--live", str(live_dir)]
        follower = _Follower(plan.run_dir, plan.step if plan.resume else 0, on_log, on_validate)
        try:
            failures, signum = _run_agent(cfg, args, Path(tmp))
        finally:
            follower.stop()
            with contextlib.suppress(OSError):
                (plan.run_dir / runs.STOP_REQUEST).unlink(missing_ok=True)
    return _outcome(plan.run_dir, failures, signum, follower.error)


def _run_agent(cfg: Config, args: list[str], tmp: Path) -> tuple[dict[int, Any], int | None]:
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
    with _rank_env(cfg), _quiet_agent(), _own_signal_handlers():
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
def _rank_env(cfg: Config) -> Iterator[None]:
    """The environment the ranks inherit: launched by diffenc (they stay quiet), never a Prefect flow
    run of their own, and the configured torch threads."""
    values = {distributed.LAUNCHED_ENV: "1", "DIFFENC_PREFECT": "0"}
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
    """Calls ``on_log``/``on_validate`` for each row rank 0 adds to the run's history, from a thread.

    Only rows written after this launch count (the status file is rewritten when the ranks start, after
    an old run's files were removed). A callback's exception asks the ranks to stop (the run's
    stop-request file) and is kept in ``error``.
    """

    def __init__(self, run_dir: Path, after_step: int, on_log: trainer.Callback | None,
                 on_validate: trainer.Callback | None):
        self.run = runs.Run(run_dir)
        self.seen = after_step
        self.on_log, self.on_validate = on_log, on_validate
        self.error: BaseException | None = None
        self.launched = time.time()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        if on_log is not None or on_validate is not None:
            self.thread = threading.Thread(target=self._follow, name="diffenc-follow", daemon=True)
            self.thread.start()

    def _follow(self) -> None:
        while not self.done.wait(FOLLOW_S):
            self.poll()

    def poll(self) -> None:
        status = self.run.file(runs.STATUS)
        if self.error is not None or not status.is_file() or status.stat().st_mtime < self.launched:
            return
        history = self.run.history()
        if history is None:
            return
        try:
            for row in history[history["step"] > self.seen].to_dict("records"):
                step = self.seen = int(row["step"])
                row = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
                if self.on_log is not None:
                    self.on_log(step, row)
                val = {k: v for k, v in row.items() if k.startswith(VAL_PREFIX)}
                if val and self.on_validate is not None:
                    self.on_validate(step, val)
        except BaseException as err:  # handed to the caller once the ranks have stopped
            self.error = err
            with contextlib.suppress(OSError, DiffencError):
                runs.atomic_write_text(self.run.file(runs.STOP_REQUEST), str(err) or type(err).__name__)

    def stop(self) -> None:
        """Stop following, after delivering the rows written last."""
        if self.thread is None:
            return
        self.done.set()
        self.thread.join()
        self.poll()
