"""Throwaway local servers for the load benchmarks and the tests that need them: PostgreSQL 15
(``initdb`` into a temporary folder) and a Prefect server (its own ``PREFECT_HOME``, on SQLite or
on that PostgreSQL). Each binds 127.0.0.1 on a free port and is stopped, its folder removed, by
whoever started it (``with`` or ``stop()``).

PostgreSQL refuses to run as root: as root, ``initdb`` and ``postgres`` run as the unprivileged
user ``DIFFENC_PG_USER`` (default ``postgres``, which the Debian package creates). The binaries
come from ``DIFFENC_PG_BIN`` (default ``/usr/lib/postgresql/15/bin``), else from ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

PG_BIN = Path(os.environ.get("DIFFENC_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = os.environ.get("DIFFENC_PG_USER", "postgres")  # who runs the server when we are root
PG_SUPERUSER = "diffenc"  # the database role initdb creates (password-protected)
PG_READY_S = 60
PREFECT_READY_S = 180  # a new database needs ~20 s of migrations, more on a loaded machine
STOP_S = 30
POLL_S = 0.25


class ServerMissing(RuntimeError):
    """The server's programs (or the user to run them as) are not on this machine."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = STOP_S) -> None:
    """``sig`` to the process group ``proc`` leads, SIGKILL to what is left after ``wait_s``; reap it."""
    for s, wait in ((sig, wait_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=POLL_S)  # reaps the leader (a zombie still counts in its group)
        if not _group_alive(proc.pid):
            break
    proc.wait()


# ------------------------------------------------------------------------------------ PostgreSQL
def pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``, or None."""
    if (PG_BIN / "initdb").is_file() and (PG_BIN / "postgres").is_file():
        return PG_BIN
    found = shutil.which("initdb")
    return Path(found).parent if found and (Path(found).parent / "postgres").is_file() else None


def pg_missing() -> str | None:
    """Why a PostgreSQL server cannot be started here (None when it can)."""
    if pg_bin() is None:
        return f"no PostgreSQL at {PG_BIN} or on PATH (apt-get install -y postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "the psycopg2 driver is not installed (pip install 'diffenc[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return (f"running as root and no user '{PG_USER}' to run PostgreSQL as (it refuses root): "
                    f"useradd --system {PG_USER}, or set DIFFENC_PG_USER")
    return None


class PostgresServer:
    """``initdb`` + ``postgres`` in a temporary folder, listening on 127.0.0.1 only (no Unix socket),
    password authentication for the superuser :data:`PG_SUPERUSER`."""

    def __init__(self) -> None:
        why = pg_missing()
        if why:
            raise ServerMissing(why)
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="diffenc-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.password = secrets.token_hex(16)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam(PG_USER)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(self.root, user.pw_uid, user.pw_gid)

    def _run(self, cmd: list[str]) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), cwd=self.root, **self._as)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({res.returncode}):\n{res.stdout}{res.stderr}")

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root)}

    def start(self) -> PostgresServer:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, self._as["user"], self._as["group"])
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_SUPERUSER, "--pwfile", str(pwfile),
                   "--auth", "scram-sha-256", "--no-locale", "-E", "UTF8", "--no-sync"])
        pwfile.unlink()
        self.port = free_port()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, env=self._env(), cwd=self.root, start_new_session=True,
                **self._as)
        deadline = time.monotonic() + PG_READY_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start (exit {self.proc.returncode}):\n{tail}")
            time.sleep(POLL_S)
        return self

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_SUPERUSER, password=self.password,
                                dbname=dbname, connect_timeout=5)

    def _ready(self) -> bool:
        try:
            self.connect().close()
        except Exception:  # not accepting connections yet
            return False
        return True

    def create_database(self, name: str) -> None:
        con = self.connect()
        con.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()

    def url(self, dbname: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL (``postgresql://`` for Optuna, ``postgresql+asyncpg://`` for Prefect)."""
        return f"{driver}://{PG_SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then remove the folder."""
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc, signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------- Prefect
def prefect_env(home: Path, api_url: str, database_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect server and its clients: their own home, no UI, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DIFFENC_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return env


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 and a free port, its home (and SQLite database, unless
    ``database_url`` points elsewhere) in a temporary folder."""

    def __init__(self, database_url: str | None = None, root: Path | None = None) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="diffenc-prefect-"))
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = prefect_env(self.root / "home", self.api, database_url)
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self._own_root = root is None

    def start(self) -> PrefectServer:
        prefect = str(Path(sys.executable).parent / "prefect")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + PREFECT_READY_S
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"the Prefect server did not start (exit {self.proc.returncode}):\n{tail}")
            time.sleep(POLL_S)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api}/health", timeout=2).json() is True
        except (httpx.HTTPError, ValueError):
            return False

    def post(self, path: str, body: dict[str, Any], tries: int = 8) -> Any:
        """One API call, retried like Prefect's client on 429/502/503 (a busy SQLite answers 503)."""
        for attempt in range(tries):
            r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
            if r.status_code not in (429, 502, 503) or attempt == tries - 1:
                break
            time.sleep(min(0.5 * 2**attempt, 8))
        r.raise_for_status()
        return r.json()

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.api}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def deployment_id(self, name: str) -> str | None:
        """The id of deployment ``flow/deployment``; None until it is registered."""
        try:
            return self.get(f"/deployments/name/{name}")["id"]
        except httpx.HTTPStatusError:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
