"""Start the dashboard: ``diffenc dashboard --runs-dir runs [--storage …] [--host 127.0.0.1] [--port 8501]``.

Runs ``streamlit run dashboard/app.py`` headless, bound to loopback unless told otherwise, with
the runs folder and the Optuna storage passed through environment variables. SIGTERM, SIGINT
(Ctrl-C) and SIGHUP stop streamlit too, so the port is free once this process has exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dashboard.settings import RUNS_DIR_ENV, STORAGE_ENV

APP = Path(__file__).resolve().parent / "app.py"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each stops the dashboard, child included
STOP_TIMEOUT_S = 5.0  # after a stop signal, streamlit gets this long to exit before it is killed
POLL_S = 0.2  # how often the launcher checks on streamlit while waiting for it or for a signal


def command(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The ``streamlit run`` command line (headless, no telemetry, no file watcher over runs/)."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(port),
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
    ]


def environment(runs_dir: str | Path = "runs", storage: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[RUNS_DIR_ENV] = str(Path(runs_dir).expanduser().resolve())
    if storage:
        from dashboard.optuna_io import normalise

        env[STORAGE_ENV] = normalise(storage)
    else:
        env.pop(STORAGE_ENV, None)
    root = str(APP.parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def main(runs_dir: str | Path = "runs", storage: str | None = None, host: str = "127.0.0.1",
         port: int = 8501) -> int:
    """Serve the dashboard until interrupted; returns streamlit's exit status (128 + N after signal N)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        print(f"note: {runs_dir} does not exist yet; the dashboard will show it empty", file=sys.stderr)
    if host not in LOOPBACK:
        print(f"warning: binding to {host}: the dashboard has no authentication; anyone who can reach "
              "this address can read your runs", file=sys.stderr)
    print(f"diffenc dashboard on http://{'localhost' if host in LOOPBACK else host}:{port} "
          f"(runs: {runs_dir.resolve()}) — Ctrl-C to stop", file=sys.stderr)
    return serve(command(host, port), environment(runs_dir, storage))


def serve(cmd: list[str], env: dict[str, str], stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run ``cmd`` until it exits or this process gets SIGTERM/SIGINT/SIGHUP; then stop it and wait.

    The signal is forwarded to the child (its own process group, so a terminal's Ctrl-C reaches it
    once, through us); a child still alive ``stop_timeout_s`` later is killed. Either way the child
    is gone, and its port free, when this returns.
    """
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if main_thread else {}
    try:
        proc = subprocess.Popen(cmd, env=env, process_group=0)
        if received:  # a signal that came while the child was starting
            on_signal(received[0], None)
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + stop_timeout_s
            if deadline is not None and time.monotonic() > deadline:
                print(f"diffenc dashboard: streamlit did not stop within {stop_timeout_s:g} s; killing it",
                      file=sys.stderr)
                _kill_group(proc)
                rc = proc.wait()
                break
    except BaseException:  # never leave the server behind, whatever stopped us
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
            proc.wait()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 + received[0] if received else rc


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child and anything it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # already gone
        pass


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs-dir", default=os.environ.get(RUNS_DIR_ENV, "runs"))
    ap.add_argument("--storage", default=os.environ.get(STORAGE_ENV))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8501)
    a = ap.parse_args()
    sys.exit(main(a.runs_dir, a.storage, a.host, a.port))
