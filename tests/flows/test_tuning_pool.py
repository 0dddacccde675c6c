"""``diffenc tune --workers N`` in real processes (issue 12, item 6): a worker SIGKILLed mid-trial is
reported while the study runs, replaced, and makes the command exit with WORKER_DIED_EXIT; the
pool's files live in the study's folder and a SIGKILLed ``diffenc tune`` leaves none behind after
the next start. Tiny linear-Gaussian trials of about a second each.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from tiny import tiny
from typer.testing import CliRunner

from diffenc_core import config, runs
from flows.cli import app
from flows.tuning import WORKER_DIED_EXIT
from flows.tuning.pool import FOLDER_PREFIX

REPO = Path(__file__).resolve().parents[2]
SETS = tiny("data.dataset=linear_gaussian", "data.count=2000", "tune.report_every=10", "tune.trial_steps=50",
            "tune.pruner=none", "tune.heartbeat_interval=1", "tune.grace_period=2")
SPACE = {"train.lr_encoder": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}}  # cheap trials
DEADLINE_S = 120  # the longest any wait below may take before the test fails


def start_tune(tmp: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """``diffenc tune ARGS`` in its own session, stdout/stderr to files, temporary files to ``tmp/tmpdir``."""
    config.dump(config.with_overrides(config.load(None, SETS), {"tune.space": SPACE}), "params.yaml")
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp / "tmpdir")}
    out, err = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "tune", "--params", "params.yaml", *args],
                                env=env, stdout=o, stderr=e, start_new_session=True)
    return proc, out, err


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the command and its workers (they share its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def running_pids(db: str, reported: bool) -> list[int]:
    """Worker pids of RUNNING trials (only those that reported a validation value if ``reported``)."""
    if not Path(db).exists():
        return []
    query = ("SELECT a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
             "WHERE a.key = 'pid' AND t.state = 'RUNNING'")
    if reported:
        query += " AND EXISTS (SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [int(row[0]) for row in con.execute(query)]
    except sqlite3.Error:  # tables not created yet, or busy
        return []


def wait_for(what: str, check, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the command exited before {what}"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False


def check_study(name: str, n: int) -> optuna.Study:
    """Exactly ``n`` finished trials, none RUNNING, no number or run directory used twice."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///runs/tune/{name}.db")
    trials = study.trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len({t.number for t in trials}) == len(trials)
    paths = [t.user_attrs["run_path"] for t in finished]
    assert len(set(paths)) == n and all(runs.open_run(p).status()["state"] == "done" for p in paths)
    return study


@pytest.mark.slow
def test_dead_worker_is_reported_replaced_and_fails_the_command(in_tmp):
    proc, out, err = start_tune(in_tmp, "--study", "w", "--n-trials", "4", "--workers", "2")
    try:
        victim = wait_for("a trial mid-way", lambda: running_pids("runs/tune/w.db", reported=True), proc)[0]
        pool = list(Path("runs/tune/w").glob(f"{FOLDER_PREFIX}*"))
        assert len(pool) == 1 and (pool[0] / "worker-config.yaml").is_file()  # in the study's folder
        os.kill(victim, signal.SIGKILL)
        # reported while the study still runs (its killed trial waits grace_period before the retry)
        line = wait_for("the death report", lambda: [ln for ln in err.read_text().splitlines()
                                                     if f"(pid {victim}) was killed by SIGKILL" in ln], proc)[0]
        assert "replaces it" in line
        assert proc.wait(timeout=DEADLINE_S) == WORKER_DIED_EXIT
    finally:
        kill_group(proc)
    replacement = int(line.split("; worker ", 1)[1].split()[0])
    assert f"worker {replacement} started" in out.read_text()  # the replacement process ran
    lines = [ln for ln in err.read_text().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "killed by SIGKILL" in lines[-1] and "4/4" in lines[-1]
    assert "Traceback" not in err.read_text()

    study = check_study("w", 4)
    killed = [t for t in study.trials if t.user_attrs.get("pid") == victim and t.state == TrialState.FAIL]
    assert len(killed) == 1
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == killed[0].params
    assert not list(Path("runs/tune/w").glob(f"{FOLDER_PREFIX}*"))  # the pool's folder is removed
    assert not list((in_tmp / "tmpdir").glob("diffenc*"))  # and nothing went to the system's temp folder


@pytest.mark.slow
def test_sigkilled_tune_leaves_nothing_after_the_next_start(in_tmp):
    proc, out, _ = start_tune(in_tmp, "--study", "k", "--n-trials", "2", "--workers", "2")
    try:
        wait_for("both workers", lambda: out.exists() and all(
            f"worker {i} started" in out.read_text() for i in (0, 1)), proc)
        pids = [int(ln.split("(pid ", 1)[1].rstrip(")"))
                for ln in out.read_text().splitlines() if " started (pid " in ln]
        os.kill(proc.pid, signal.SIGKILL)  # the command only: its workers are orphaned
        proc.wait()
        assert len(list(Path("runs/tune/k").glob(f"{FOLDER_PREFIX}*"))) == 1  # left behind
        wait_for("the orphaned workers to stop by themselves", lambda: not any(alive(p) for p in pids))
    finally:
        kill_group(proc)
    assert not list((in_tmp / "tmpdir").glob("diffenc*"))

    res = CliRunner().invoke(app, ["tune", "resume", "--study", "k", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "removed 1 worker folder" in res.output
    assert not list(Path("runs/tune/k").glob(f"{FOLDER_PREFIX}*"))
    check_study("k", 2)
