"""PostgreSQL for tuning and for the Prefect server (issue 19 items 13 and 14), on a real PostgreSQL 15
server this module starts itself (``benchmarks.servers.PostgresServer``: initdb into a temporary
folder, 127.0.0.1 and a free port, a random password, stopped and removed at the end).

* ``tune.storage=postgresql://…`` as the README writes it, the password from ``PGPASSWORD`` (not
  in the URL): a study with 2 worker processes ends with every trial finished, none lost or
  duplicated. Before the fix the URL failed with "Failed to import DB access module".
* A missing driver is one line naming the extra (the import failure is simulated).
* The Prefect server on PostgreSQL (``PREFECT_API_DATABASE_CONNECTION_URL``) with ``diffenc serve``
  at its default limit: a queue of flow runs ends Completed, the server's state is in PostgreSQL
  and its log has no "database is locked".

Without PostgreSQL this module skips; with CI=true it fails (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from tiny import TINY_SETS, tiny
from typer.testing import CliRunner

from benchmarks.servers import PostgresServer, PrefectServer, pg_missing, stop_group
from diffenc_core import config, runs
from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SETS = tiny("data.dataset=linear_gaussian", "data.count=2000", "tune.report_every=10", "tune.trial_steps=40",
            "tune.pruner=none", "tune.heartbeat_interval=1", "tune.grace_period=5")
SPACE = {"train.lr_encoder": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}}
N_TRIALS = 6
N_FLOW_RUNS = 4
DEADLINE_S = 300  # the longest the flow-run queue may take before the test fails

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def pg():
    why = pg_missing()
    if why:
        if ON_CI:
            pytest.fail(f"PostgreSQL tests cannot run on CI: {why}")
        pytest.skip(why)
    with PostgresServer() as server:
        yield server


# ------------------------------------------------------------------------------------ no server
@pytest.mark.parametrize("url", ["postgresql://me:secret@127.0.0.1:1/optuna", "postgresql+psycopg2://me@h/optuna"])
def test_a_missing_driver_is_one_line_naming_the_extra(in_tmp, monkeypatch, url):
    for module in ("psycopg", "psycopg2"):  # an import of a None entry fails like an absent package
        monkeypatch.setitem(sys.modules, module, None)
    config.dump(config.load(None, SETS), "params.yaml")
    res = CliRunner().invoke(app, ["tune", "--study", "s", "--n-trials", "1", "--storage", url])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'diffenc[postgres]'" in lines[0], res.output
    assert "is not installed" in lines[0] and "secret" not in lines[0] and "Traceback" not in res.output


def test_urls_are_shown_without_their_password():
    from flows.tuning.storage import shown, without_password

    assert shown("postgresql://me:s3cret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"
    assert shown("runs/tune/s.log") == "runs/tune/s.log" and shown("sqlite:///a.db") == "sqlite:///a.db"
    assert without_password("postgresql+psycopg://me:p%40ss@db/optuna?sslmode=require") == (
        "postgresql+psycopg://me@db/optuna?sslmode=require", "p@ss")
    assert without_password("postgresql://me@db/optuna") == ("postgresql://me@db/optuna", None)
    assert without_password("sqlite:///a.db") == ("sqlite:///a.db", None)


def test_a_heroku_style_scheme_is_named():
    from diffenc_core.config import Config
    from diffenc_core.errors import DiffencError
    from flows.tuning.storage import make_storage

    with pytest.raises(DiffencError, match=r"^--storage postgres://me:\*\*\*@db/x: .* write postgresql://$"):
        make_storage(Config(), "postgres://me:secret@db/x")


# --------------------------------------------------------------------------------- with a server
def test_tuning_study_with_two_workers_on_postgresql(pg, in_tmp, monkeypatch):
    pg.create_database("optuna")
    url = pg.url("optuna").replace(f":{pg.password}@", "@")  # the password comes from PGPASSWORD
    monkeypatch.setenv("PGPASSWORD", pg.password)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config.dump(config.with_overrides(config.load(None, [*SETS, f"tune.storage={url}"]), {"tune.space": SPACE}),
                "params.yaml")
    res = CliRunner().invoke(app, ["tune", "--study", "pg", "--n-trials", str(N_TRIALS), "--workers", "2"])
    assert res.exit_code == 0, res.output

    import optuna

    study = optuna.load_study(study_name="pg", storage=url)
    trials = study.trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == N_TRIALS and not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({t.number for t in trials}) == len(trials)
    paths = [t.user_attrs["run_path"] for t in trials]
    assert len(set(paths)) == len(trials)  # no trial trained into another's folder
    on_disk = {str(p.parent.resolve()) for p in Path("runs/tune/pg").glob(f"*/{runs.STATUS}")}
    assert on_disk == {str(Path(p).resolve()) for p in paths}  # no run folder without its trial
    assert all(runs.open_run(t.user_attrs["run_path"]).status()["state"] == "done" for t in finished)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    with pg.connect("optuna") as con, con.cursor() as cur:  # the study lives in PostgreSQL, not a local file
        cur.execute("SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = 'pg'")
        assert cur.fetchone()[0] == len(trials)
    assert not list(Path(".").rglob("*.db"))


def test_the_password_stays_off_the_workers_command_lines(pg, in_tmp, monkeypatch):
    """A password in the URL reaches the worker processes through PGPASSWORD, not their argv (which
    ``ps`` shows every user of the machine)."""
    from flows.tuning import pool

    pg.create_database("optuna_pw")
    url = pg.url("optuna_pw")
    monkeypatch.delenv("PGPASSWORD", raising=False)
    started: list[tuple[list[str], dict[str, str]]] = []
    real = pool.subprocess.Popen

    def spy(cmd, env=None, **kwargs):
        started.append((list(cmd), dict(env or {})))
        return real(cmd, env=env, **kwargs)

    monkeypatch.setattr(pool.subprocess, "Popen", spy)
    config.dump(config.with_overrides(config.load(None, SETS), {"tune.space": SPACE}), "params.yaml")
    res = CliRunner().invoke(app, ["tune", "--study", "pw", "--n-trials", "2", "--workers", "2", "--storage", url])
    assert res.exit_code == 0, res.output
    assert len(started) == 2
    for cmd, env in started:
        assert pg.password not in " ".join(cmd) and env["PGPASSWORD"] == pg.password
        assert cmd[cmd.index("--storage") + 1] == url.replace(f":{pg.password}@", "@")


def test_prefect_server_on_postgresql_runs_a_queue(pg, tmp_path):
    import httpx

    pg.create_database("prefect")
    with PrefectServer(pg.url("prefect", "postgresql+asyncpg"), root=tmp_path) as server:
        env = dict(server.env, PREFECT_RUNNER_POLL_FREQUENCY="1")
        log = tmp_path / "serve.log"
        sets = [f"data.root={tmp_path / 'data'}", f"train.runs_dir={tmp_path / 'runs'}"]
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "flows.serve", *sum((["--set", s] for s in sets), [])],
                                     cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            dep = _wait(lambda: server.deployment_id("diffenc-train/default"), serve, log, "the deployments")
            assert "flow runs at once (--limit)" in log.read_text()  # the machine's default limit
            ids = [server.post(f"/deployments/{dep}/create_flow_run",
                               {"parameters": {"overrides": _overrides(f"pg{i}")}})["id"] for i in range(N_FLOW_RUNS)]

            def final() -> list[dict] | None:
                rows = server.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
                done = [r for r in rows if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
                return rows if len(done) == N_FLOW_RUNS else None

            rows = _wait(final, serve, log, "the queue to drain", DEADLINE_S)
        finally:
            stop_group(serve)
        assert [r["state_type"] for r in rows] == ["COMPLETED"] * N_FLOW_RUNS, [r["state_name"] for r in rows]
        assert all((tmp_path / "runs" / f"pg{i}" / "checkpoints" / "last.pt").is_file() for i in range(N_FLOW_RUNS))
        server_log = server.log.read_text(errors="replace")
        assert "database is locked" not in server_log and "Traceback" not in server_log, server_log[-3000:]
        assert not list((tmp_path / "home").glob("*.db"))  # no SQLite database beside PostgreSQL
        with pg.connect("prefect") as con, con.cursor() as cur:
            cur.execute("SELECT count(*) FROM flow_run WHERE id = ANY(%s::uuid[])", (ids,))
            assert cur.fetchone()[0] == N_FLOW_RUNS
        assert httpx.get(f"{server.api}/health", timeout=5).json() is True


def _overrides(run: str) -> dict:
    from diffenc_core.config import parse_overrides

    return parse_overrides([*TINY_SETS, f"train.run={run}"])


def _wait(check, proc, log: Path, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the API is not answering yet
            value = None
        if value:
            return value
        assert proc.poll() is None, f"{what}: serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
