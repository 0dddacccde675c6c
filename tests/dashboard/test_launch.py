"""`diffenc dashboard` in a real subprocess: a stop signal to it stops Streamlit too (issue 12 item 5).

Before the fix, SIGTERM killed only the launcher and the orphaned Streamlit kept serving the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READY_S = 90  # the CLI imports, then streamlit starts (slow on a loaded 2-core machine)
STOPPED_S = 15  # the launcher's own kill deadline (5 s) plus slack for a loaded machine
POLL_S = 0.3

pytestmark = [pytest.mark.server]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc; empty where it is not available)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")  # a zombie is gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_stops_streamlit(tmp_path, sig):
    port = _free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("DIFFENC_OPTUNA_STORAGE", None)
    log = tmp_path / "dashboard.log"
    cmd = [sys.executable, "-m", "flows.cli", "dashboard", "--runs-dir", str(tmp_path / "runs"),
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    children: list[int] = []
    try:
        deadline = time.monotonic() + READY_S
        while not _healthy(port):
            assert proc.poll() is None, f"dashboard exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {READY_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(POLL_S)
        children = _children(proc.pid)

        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOPPED_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher ignored {sig.name} for {STOPPED_S} s:\n{log.read_text()[-3000:]}")
        assert not _healthy(port), f"streamlit still serves port {port} after {sig.name} to the launcher"
        assert not [c for c in children if _alive(c)], f"streamlit ({children}) outlived the launcher"
    finally:
        for pid in [proc.pid, *children]:  # whatever the outcome, nothing this test started survives it
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()
