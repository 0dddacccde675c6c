"""Start the dashboard: ``diffenc dashboard --runs-dir runs [--storage …] [--host 127.0.0.1] [--port 8501]``.

Runs ``streamlit run dashboard/app.py`` headless, bound to loopback unless told otherwise, with
the runs folder and the Optuna storage passed through environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dashboard.settings import RUNS_DIR_ENV, STORAGE_ENV

APP = Path(__file__).resolve().parent / "app.py"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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
    """Serve the dashboard until interrupted; returns streamlit's exit status."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        print(f"note: {runs_dir} does not exist yet; the dashboard will show it empty", file=sys.stderr)
    if host not in LOOPBACK:
        print(f"warning: binding to {host}: the dashboard has no authentication; anyone who can reach "
              "this address can read your runs", file=sys.stderr)
    print(f"diffenc dashboard on http://{'localhost' if host in LOOPBACK else host}:{port} "
          f"(runs: {runs_dir.resolve()}) — Ctrl-C to stop", file=sys.stderr)
    proc = subprocess.Popen(command(host, port), env=environment(runs_dir, storage))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs-dir", default=os.environ.get(RUNS_DIR_ENV, "runs"))
    ap.add_argument("--storage", default=os.environ.get(STORAGE_ENV))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8501)
    a = ap.parse_args()
    sys.exit(main(a.runs_dir, a.storage, a.host, a.port))
