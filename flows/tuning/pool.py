"""The local worker pool of ``diffenc tune --workers N``: N worker processes on one study.

A worker that dies (a signal, a crash) is reported on stderr when it dies and replaced by a new
one, at most MAX_REPLACEMENTS times per command; its trial is failed and retried through the
storage's heartbeat. The pool's files (the configuration the workers read, a lock that says the
pool is alive) live in ``<runs_dir>/tune/<study>/.workers-XXXX/``, removed when the pool stops;
one left behind by a SIGKILLed ``diffenc tune`` is removed by the next start (``clean_stale``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from diffenc_core import config as config_mod
from diffenc_core.config import Config
from diffenc_core.errors import USER_ERROR_EXIT, WORKER_DIED_EXIT, DiffencError, signal_exit
from flows.tuning.output import say
from flows.tuning.storage import without_password

MAX_REPLACEMENTS = 3
"""Dead workers one ``diffenc tune`` command replaces; after that the others finish the study."""
POLL_S = 0.2  # how often the pool looks at its workers: a death is reported within this time
STOP_GRACE_S = 10.0  # a stopped pool's workers get this long to fail their trial cleanly (SIGINT)
FOLDER_PREFIX = ".workers-"
CONFIG_FILE = "worker-config.yaml"  # not params.yaml: the pool's folder is not a run directory
LOCK_FILE = "pool.lock"
"""Exit status of ``diffenc tune`` when a worker died during the study (even if it was replaced)."""
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class WorkerDied(DiffencError):
    """A worker process died during the study; the CLI exits with WORKER_DIED_EXIT."""

    exit_code = WORKER_DIED_EXIT


@dataclass
class Outcome:
    """What happened to the pool's workers."""

    died: list[str] = field(default_factory=list)  # "worker 1 (pid 123) was killed by SIGKILL"
    errors: list[int] = field(default_factory=list)  # workers that stopped on a DiffencError
    replaced: int = 0


def clean_stale(study_folder: Path) -> list[Path]:
    """Remove pool folders whose pool is gone (its lock is free); returns them."""
    removed: list[Path] = []
    if not study_folder.is_dir():
        return removed
    for folder in sorted(study_folder.glob(f"{FOLDER_PREFIX}*")):
        if not folder.is_dir():
            continue
        lock = FileLock(folder / LOCK_FILE)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue  # a live pool: another `diffenc tune` of this study on this machine
        lock.release()
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextlib.contextmanager
def pool_folder(study_folder: Path) -> Iterator[Path]:
    """A fresh pool folder under the study's folder, locked while the pool lives, then removed."""
    study_folder.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=study_folder))
    lock = FileLock(folder / LOCK_FILE)
    lock.acquire()
    try:
        yield folder
    finally:
        lock.release()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM ends the pool like Ctrl-C does (workers stopped, folder removed), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(signal_exit(signum))

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def how_it_ended(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def run_pool(
    cfg: Config,
    name: str,
    url: str,
    n_trials: int,
    workers: int,
    folder_of_study: Path,
    finished: Callable[[], int],
    ignore_running: frozenset[int] = frozenset(),
) -> Outcome:
    """Run ``workers`` processes of ``python -m flows.tuning worker`` until all have exited.

    ``finished()`` counts the study's finished trials: a dead worker is replaced only while the
    study still needs trials.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    url, password = without_password(url)  # a database password never goes on a command line
    if password is not None:
        env["PGPASSWORD"] = password
    outcome = Outcome()
    running: dict[int, subprocess.Popen] = {}
    with pool_folder(folder_of_study) as folder, sigterm_stops():
        cfg_file = folder / CONFIG_FILE
        config_mod.dump(cfg, cfg_file)
        cmd = [sys.executable, "-m", "flows.tuning", "worker", "--config", str(cfg_file), "--study", name,
               "--storage", url, "--n-trials", str(n_trials), "--parent", str(os.getpid())]
        if ignore_running:
            cmd += ["--ignore-running", ",".join(map(str, sorted(ignore_running)))]

        def start(index: int) -> None:
            running[index] = subprocess.Popen([*cmd, "--index", str(index)], env=env)

        for index in range(workers):
            start(index)
        next_index = workers
        try:
            while running:
                time.sleep(POLL_S)
                for index, proc in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[index]
                    if rc == 0:
                        continue
                    if rc == USER_ERROR_EXIT:  # a worker stopped on a DiffencError (its message is on stderr)
                        outcome.errors.append(index)
                        say(f"[yellow]worker {index} stopped on the error above[/]", stderr=True)
                        continue
                    what = f"worker {index} (pid {proc.pid}) {how_it_ended(rc)}"
                    outcome.died.append(what)
                    if finished() >= n_trials:
                        note = "the study has its trials, not replacing it"
                    elif outcome.replaced >= MAX_REPLACEMENTS:
                        note = f"not replacing it: {MAX_REPLACEMENTS} replacements made already"
                    else:
                        start(next_index)
                        outcome.replaced += 1
                        note = (f"worker {next_index} replaces it "
                                f"(replacement {outcome.replaced} of at most {MAX_REPLACEMENTS})")
                        next_index += 1
                    say(f"[bold yellow]{what}; {note}[/]", stderr=True)
        finally:
            stop_all(list(running.values()))
    return outcome


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGINT (each fails its trial and re-queues it), then SIGKILL what is left after STOP_GRACE_S."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
