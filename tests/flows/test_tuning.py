"""Optuna tuning (issue 6): pruning, resume, parallel workers, a killed worker, Pareto fronts,
optuna-dashboard and search-space errors; `tune resume`, stored settings, exact export and uncut
tables (issue 12); the worker pool's own tests are in test_tuning_pool.py. Tiny budgets on a
linear-Gaussian toy (about a second a trial); the whole file takes well under two minutes on one core.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from procs import stop
from tiny import tiny
from typer.testing import CliRunner

from diffenc_core import config, runs
from flows import tuning
from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
TOY = ["data.dataset=linear_gaussian", "data.count=2000", "tune.report_every=10"]


def make_cfg(*extra: str) -> config.Config:
    return config.load(None, tiny(*TOY, *extra))


def load(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///runs/tune/{name}.db")


def load_journal(name: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(f"runs/{name}.log")))


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def finished(study: optuna.Study) -> int:
    return sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states(study))


def test_study_runs_prunes_resumes_and_exports(in_tmp):
    cfg = make_cfg("tune.trial_steps=20")
    out = tuning.run_study(cfg, study="p", n_trials=6)
    assert out["counts"]["finished"] == 6
    study = load("p")
    assert [t.number for t in study.trials] == list(range(6))
    assert TrialState.PRUNED in states(study) and TrialState.COMPLETE in states(study)
    for t in study.trials:
        run = runs.open_run(t.user_attrs["run_path"])
        assert run.path == Path("runs/tune/p") / str(t.number)
        assert run.status()["state"] == ("done" if t.state == TrialState.COMPLETE else "stopped")
        assert t.intermediate_values and min(t.intermediate_values) == 10
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(t.last_step < 20 for t in pruned)

    # the same command again: nothing to do; a larger target: continues where it stopped
    tuning.run_study(cfg, study="p", n_trials=6)
    assert len(load("p").trials) == 6
    tuning.run_study(cfg, study="p", n_trials=7)
    assert finished(load("p")) == 7 and len(load("p").trials) == 7

    # show + export: a full params file that `diffenc train --params` accepts
    shown = tuning.show_study(cfg, study="p", export="best.yaml")
    best = load("p").best_trial
    assert shown["best"][0]["number"] == best.number
    exported = config.load("best.yaml")
    tree = exported.to_dict()
    for key, value in best.params.items():
        section, _, leaf = key.partition(".")
        assert tree[section][leaf] == value
    assert exported.train.steps == cfg.train.steps  # the full budget, not tune.trial_steps
    res = CliRunner().invoke(app, ["train", "--params", "best.yaml", "--set", "train.run=tuned", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert runs.open_run("runs/tuned").status()["state"] == "done"


def test_multi_objective_gives_pareto_front(in_tmp):
    cfg = make_cfg("tune.trial_steps=10", "tune.objective=rate_distortion")
    out = tuning.run_study(cfg, study="mo", n_trials=4)
    study = load("mo")
    assert len(study.directions) == 2 and finished(study) == 4
    assert TrialState.PRUNED not in states(study)
    front = out["pareto_front"]
    assert front and {f["number"] for f in front} == {t.number for t in study.best_trials}
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for f in front:  # nobody dominates a front member
        r, d = f["values"]
        assert not any(t.values[0] <= r and t.values[1] <= d and t.values != [r, d] for t in done)
        assert f["values"] == [study.trials[f["number"]].user_attrs[k] for k in ("val_rate", "val_distortion")]
    shown = tuning.show_study(cfg, study="mo", export="front.yaml")
    assert shown["export"]["trial"] in {f["number"] for f in front}
    assert Path("front.yaml").is_file()


@pytest.mark.slow
def test_two_workers_finish_exactly_the_target(in_tmp):
    cfg = make_cfg("tune.trial_steps=10")
    tuning.run_study(cfg, study="w", n_trials=4, workers=2)
    study = load("w")
    numbers = [t.number for t in study.trials]
    assert finished(study) == 4 and len(numbers) == 4 and len(set(numbers)) == 4
    assert TrialState.RUNNING not in states(study) and TrialState.FAIL not in states(study)
    paths = {t.user_attrs["run_path"] for t in study.trials}
    assert len(paths) == 4 and all(Path(p, runs.STATUS).is_file() for p in paths)
    assert {t.user_attrs["worker"] for t in study.trials} <= {0, 1}


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried_on_resume(in_tmp):
    sets = tiny(*TOY, "tune.trial_steps=50", "tune.pruner=none", "tune.heartbeat_interval=1", "tune.grace_period=2")
    cfg = config.load(None, sets)
    config.dump(cfg, "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "tune", "--params", "params.yaml", "--study", "k", "--n-trials", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:  # kill once trial 0 has reported its first validation value (mid-trial)
            assert time.monotonic() < deadline, "the worker never started a trial"
            assert proc.poll() is None, "the worker exited before it could be killed"
            if _reported("runs/tune/k.db"):
                break
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = load("k").trials[0]
    assert killed.state == TrialState.RUNNING  # stuck, until a heartbeat check reaps it
    assert killed.intermediate_values
    time.sleep(cfg.tune.grace_period + 2)

    tuning.run_study(cfg, study="k", n_trials=2)  # the same command again
    study = load("k")
    by_number = {t.number: t for t in study.trials}
    assert by_number[0].state == TrialState.FAIL
    assert finished(study) == 2 and TrialState.RUNNING not in states(study)
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.user_attrs["retry_of"] == 0 and retry.user_attrs["run_path"] == f"runs/tune/k/{retry.number}"
    assert runs.open_run("runs/tune/k/0").status()["state"] == "failed"
    assert len({t.number for t in study.trials}) == len(study.trials) == 3  # nothing lost or duplicated


def _reported(db: str) -> bool:
    """Whether any trial has reported an intermediate value (read without creating the file)."""
    if not Path(db).exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM trial_intermediate_values").fetchone()[0] > 0
    except sqlite3.Error:  # tables not created yet, or busy
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_optuna_dashboard_lists_the_study(in_tmp):
    cfg = make_cfg("tune.trial_steps=5")
    tuning.run_study(cfg, study="dash", n_trials=1)
    url = tuning.storage_url(cfg, "dash")
    assert url == "sqlite:///runs/tune/dash.db"
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("space", "key"),
    [
        ({"em.bogus": {"type": "float", "low": 0.1, "high": 1.0}}, "em.bogus"),
        ({"em.step_size": {"type": "float", "low": 0.1, "high": 0.01}}, "em.step_size"),
        ({"em.step_size": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "em.step_size"),
        ({"em.e_step": {"type": "categorical"}}, "em.e_step"),
        ({"em.e_step": {"type": "float", "low": 0.1, "high": 1.0}}, "em.e_step"),
        ({"em.e_step": {"type": "categorical", "choices": ["mala", "hmc"]}}, "em.e_step"),
        ({"em.encoder_updates": {"type": "int", "low": 0, "high": 3}}, "em.encoder_updates"),
        ({"em.langevin_steps": {"type": "int", "low": 2.5, "high": 9}}, "em.langevin_steps"),
        ({"train.run": {"type": "categorical", "choices": ["a", "b"]}}, "train.run"),
        ({"data.seed": {"type": "int", "low": 0, "high": 3}}, "data.seed"),
    ],
)
def test_bad_search_space_is_a_clear_error(in_tmp, space, key):
    Path("params.yaml").write_text(yaml.safe_dump({"tune": {"space": space}}))
    res = CliRunner().invoke(app, ["tune", "--params", "params.yaml", "--n-trials", "1"])
    assert res.exit_code == 2, res.output
    assert key in res.output and "Traceback" not in res.output
    assert not Path("runs/tune").exists()  # rejected before any storage or trial exists


def test_always_failing_trials_stop_the_study_with_the_reason(in_tmp):
    space = {"em.step_size": {"type": "float", "low": 0.5, "high": 0.9},
             "em.step_size_max": {"type": "float", "low": 0.1, "high": 0.4}}  # each end valid, no pair valid
    Path("params.yaml").write_text(yaml.safe_dump({"tune": {"space": space}}))
    res = CliRunner().invoke(app, ["tune", "--params", "params.yaml", "--study", "f", "--n-trials", "3",
                                   *sum((["--set", s] for s in tiny(*TOY)), [])])
    assert res.exit_code == 2, res.output
    assert "in a row failed" in res.output and "step_size" in res.output
    study = load("f")
    assert all(t.state == TrialState.FAIL and "step_size" in t.user_attrs["error"] for t in study.trials)


def test_storage_choices_and_show_errors(in_tmp):
    cfg = make_cfg()
    assert tuning.storage_url(cfg, "s") == "sqlite:///runs/tune/s.db"
    assert tuning.storage_url(cfg, "s", "tune.sqlite") == "sqlite:///tune.sqlite"
    assert tuning.storage_url(cfg, "s", "postgresql://u@h/db") == "postgresql://u@h/db"
    assert tuning.is_journal(tuning.storage_url(cfg, "s", "tune.log"))
    tuning.run_study(make_cfg("tune.trial_steps=5"), study="j", storage="runs/j.log", n_trials=1)
    assert Path("runs/j.log").is_file() and not Path("runs/tune/j.db").exists()
    res = CliRunner().invoke(app, ["tune", "show", "--study", "j", "--storage", "runs/j.log", "--export", "j.yaml",
                                   "--trial", "0"])
    assert res.exit_code == 0, res.output
    assert config.load("j.yaml").em.step_size == load_journal("j").trials[0].params["em.step_size"]
    res = CliRunner().invoke(app, ["tune", "--study", "j", "--storage", "runs/j.log", "--set",
                                   "tune.objective=rate_distortion", *sum((["--set", s] for s in tiny(*TOY)), [])])
    assert res.exit_code == 2 and "tune.objective" in res.output  # a study keeps its objective
    res = CliRunner().invoke(app, ["tune", "show", "--study", "nothing"])
    assert res.exit_code == 2 and "no tuning storage" in res.output
    res = CliRunner().invoke(app, ["tune", "--study", "a/b"])
    assert res.exit_code == 2 and "--study" in res.output
    res = CliRunner().invoke(app, ["tune", "--set", "tune.grace_period=2", "--set", "tune.heartbeat_interval=5"])
    assert res.exit_code == 2 and "tune.grace_period" in res.output


def _sets(*sets: str) -> list[str]:
    return sum((["--set", s] for s in sets), [])


def _flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys to leaves (the search space as one leaf)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and f"{prefix}{k}" != "tune.space":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_resume_show_and_export_use_what_the_study_stored(in_tmp, monkeypatch):
    """Issue 12, items 8 and 10: a study stores its settings; `tune resume` needs only its name,
    `tune show` prints that line and uncut tables, `--export` reproduces a trial's configuration."""
    monkeypatch.delenv("COLUMNS", raising=False)
    runner = CliRunner()
    started = tiny(*TOY, "tune.trial_steps=10", "tune.pruner=none", "em.warmup_steps=2")  # a --set the study keeps
    res = runner.invoke(app, ["tune", "--study", "r", "--n-trials", "2", *_sets(*started)])
    assert res.exit_code == 0, res.output
    attrs = load("r").user_attrs
    assert attrs["n_trials"] == 2 and attrs["objective"] == "neg_elbo"
    assert set(attrs["space"]) == set(config.Config().tune.space)
    assert attrs["config"] == config.load(None, [*started, "tune.study=r", "tune.n_trials=2"]).to_dict()

    # no params.yaml, no --set: the export is still the best trial's own configuration
    res = runner.invoke(app, ["tune", "show", "--study", "r", "--export", "best.yaml"])
    assert res.exit_code == 0, res.output
    best = load("r").best_trial
    exported = _flat(yaml.safe_load(Path("best.yaml").read_text()))
    trained = _flat(yaml.safe_load(Path(best.user_attrs["run_path"], runs.PARAMS).read_text()))
    assert exported["em.warmup_steps"] == 2 and exported["train.steps"] == 20  # the full budget (tiny), not trial_steps
    for key in tuning.MANAGED_KEYS:  # set per trial: its run name and folder, tune.trial_steps, val_every
        exported.pop(key), trained.pop(key)
    assert exported == trained
    # the resume line, and every column of the top-trials table whole although stdout is not a terminal
    assert "to resume it: diffenc tune resume --study r" in res.stdout
    for column in ("alignment", "e_step", "encoder_updates", "langevin_steps", "persistent", "step_size",
                   "target_accept", "beta", "lr_decoder", "lr_encoder"):
        assert f" {column} " in res.stdout
    assert "…" not in res.stdout and max(len(line) for line in res.stdout.splitlines()) > 80

    # other settings are refused, naming the key; resume ignores params.yaml and continues as stored
    res = runner.invoke(app, ["tune", "--study", "r", "--n-trials", "3", *_sets(*started, "em.warmup_steps=3")])
    assert res.exit_code == 2 and "em.warmup_steps: 2 → 3" in res.stderr and "Traceback" not in res.output
    Path("params.yaml").write_text(yaml.safe_dump({"em": {"warmup_steps": 7}, "tune": {"n_trials": 9}}))
    res = runner.invoke(app, ["tune", "resume", "--study", "r"])
    assert res.exit_code == 0, res.output
    assert len(load("r").trials) == 2  # it had its target: nothing to run
    res = runner.invoke(app, ["tune", "resume", "--study", "r", "--n-trials", "3"])
    assert res.exit_code == 0, res.output
    study = load("r")
    assert finished(study) == 3 and len(study.trials) == 3 and study.user_attrs["n_trials"] == 3
    third = config.load(Path(study.trials[2].user_attrs["run_path"], runs.PARAMS))
    assert third.em.warmup_steps == 2 and third.data.dataset == "linear_gaussian" and third.train.steps == 10

    # an unknown study and other mistakes: one line naming the culprit, exit 2, nothing changed
    mistakes = [(["resume", "--study", "nope"], "nope"),
                (["resume", "--study", "nope", "--storage", "runs/tune/r.db"], "nope"),
                (["resume", "--study", "r", "--n-trials", "0"], "--n-trials"),
                (["resume", "--study", "r", "--workers", "0"], "--workers"),
                (["show", "--study", "r", "--export", "runs/tune"], "--export"),  # a folder
                (["show", "--study", "r", "--export", "x.yaml", "--trial", "99"], "--trial")]
    for args, culprit in mistakes:
        res = runner.invoke(app, ["tune", *args])
        assert res.exit_code == 2, (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and culprit in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.output
    assert len(load("r").trials) == 3 and not Path("x.yaml").exists()
