"""`streamlit run dashboard/app.py` binds loopback whatever its working folder (issue 19 item 11).

Before the fix the settings lived in the repository root's ``.streamlit/config.toml``, which
Streamlit reads from the working folder only: started from anywhere else, the app listened on
every interface (``*:PORT``). Here it is started from an empty folder with an empty ``HOME`` and no
``--server.address``, and the kernel's table of listening sockets is read back.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from procs import stop

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
READY_S = 90  # streamlit's start on a loaded 2-core machine
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}

pytestmark = [pytest.mark.server]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order, little-endian here)."""
    raw = bytes.fromhex(hex_ip)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listening(port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of every TCP socket listening on ``port`` (IPv4 and IPv6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            ip, _, hex_port = fields[1].partition(":")
            if fields[3] == LISTEN and int(hex_port, 16) == port:
                found.append(_address(ip))
    return found


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def test_listening_address_decoding():
    assert _address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert _address("00000000") == ipaddress.ip_address("0.0.0.0")
    assert _address("00000000000000000000000001000000") == ipaddress.ip_address("::1")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_streamlit_run_from_another_folder_binds_loopback(tmp_path):
    port = _free_port()
    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", DIFFENC_RUNS_DIR=str(tmp_path / "runs"))
    log = tmp_path / "streamlit.log"
    with open(log, "wb") as out:  # the README's command, from a folder that is not the repository root
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port)],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_S
        while not _healthy(port):
            assert proc.poll() is None, f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {READY_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        bound = listening(port)
    finally:
        stop(proc)
    assert bound, f"nothing listens on port {port}"
    assert all(a.is_loopback for a in bound), f"streamlit listens on {[str(a) for a in bound]}, not only loopback"
    assert "gatherUsageStats" not in log.read_text() and "Collecting usage statistics" not in log.read_text()
