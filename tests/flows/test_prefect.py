"""Prefect flows end to end: a real server, ``diffenc serve``, ``prefect deployment run --watch``.

One Prefect server (temporary ``PREFECT_HOME``, free loopback port) and one serve process
(``python -m flows.serve``, cwd the project root) are shared by the whole module; the work-pool
test adds two ``prefect worker`` processes. Every process is started in its own session; at the
end each process group is killed, any process still carrying the server's ``PREFECT_HOME`` is
killed, and the test fails if any was left. Runs and data go to a temporary folder.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tiny import TINY_SETS, tiny

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
RETRY_STATUS = {429, 502, 503}

# Never touch ~/.prefect or the repo's .prefect from this test process either.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diffenc-test-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from diffenc_core.config import parse_overrides  # noqa: E402
from diffenc_core.errors import ConfigError  # noqa: E402
from flows import prefect_flows as pf  # noqa: E402

pytestmark = pytest.mark.server


# ------------------------------------------------------------------------------ process helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """A process in its own session (so its whole group can be killed), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace``; reap the leader."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if not group_alive(pgid):
                break
            time.sleep(0.1)
    if proc.poll() is None:
        proc.wait(timeout=5)


def our_processes() -> dict[int, str]:
    """pid -> environment of every process of ours (readable /proc/<pid>/environ)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "environ").read_bytes().decode(errors="replace").replace("\0", "\n")
            except OSError:
                continue
    return out


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


class Prefect:
    """The shared server: its environment, API and the processes started against it."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DIFFENC_"))},
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.data = root / "data"
        self.runs = root / "runs"
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], cwd: Path = REPO) -> subprocess.Popen:
        proc = start(cmd, self.env, self.root / f"{name}.log", cwd)
        self.procs.append(proc)
        return proc

    def request(self, method: str, path: str, body: dict | None = None, tries: int = 8):
        """One API call, retried like Prefect's own client on 429/502/503: a busy SQLite server
        answers 503 while its database is locked."""
        for attempt in range(tries):
            r = httpx.request(method, f"{self.api}{path}", json=body, timeout=10)
            if r.status_code not in RETRY_STATUS or attempt == tries - 1:
                break
            time.sleep(min(0.5 * 2**attempt, 8))
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> list[dict]:
        return self.request("POST", path, body)

    def wait_for(self, what: str, check, timeout: float, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process exited ({proc.returncode}):\n{tail(log)}")
            try:
                if check():
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        pytest.fail(f"{what}: not ready after {timeout:.0f}s:\n{tail(log)}")

    def deployment_run(self, name: str, params: dict, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [PREFECT, "deployment", "run", name, "--watch"]
        for key, value in params.items():
            cmd += ["--param", f"{key}={json.dumps(value)}"]
        return subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def flow_runs(self, flow_name: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC"})

    def logs(self, flow_run_id: str) -> str:
        rows = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
        return "\n".join(r["message"] for r in rows)


def tiny_overrides(run: str, *extra: str) -> dict:
    return parse_overrides([*TINY_SETS, f"train.run={run}", *extra])


def save_template(db: Path, template: Path) -> None:
    """An online copy of the freshly migrated database (SQLite backup API), swapped in atomically."""
    tmp = template.with_suffix(f".{os.getpid()}.tmp")
    src, dst = sqlite3.connect(db), sqlite3.connect(tmp)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    os.replace(tmp, template)


@pytest.fixture(scope="module")
def prefect(request) -> Iterator[Prefect]:
    """A Prefect server and ``python -m flows.serve`` (cwd: the project root) for the module.

    A new database needs ~10-20 s of migrations: the first run keeps a copy of the empty,
    migrated database in pytest's cache (per Prefect version) and later runs start from it.
    """
    import prefect as prefect_pkg

    root = Path(tempfile.mkdtemp(prefix="diffenc-prefect-test-"))
    p = Prefect(root)
    template = request.config.cache.mkdir("diffenc-prefect") / f"prefect-{prefect_pkg.__version__}.db"
    db = Path(p.env["PREFECT_HOME"]) / "prefect.db"
    db.parent.mkdir(parents=True)
    if template.is_file():
        shutil.copyfile(template, db)
    try:
        t0 = time.monotonic()
        server = p.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(p.port)])
        p.wait_for("server", lambda: httpx.get(f"{p.api}/health", timeout=2).json() is True, 120,
                   server, root / "server.log")
        if not template.is_file():
            save_template(db, template)
        p.timings = {"server_s": time.monotonic() - t0}
        t0 = time.monotonic()
        serve = p.start("serve", [sys.executable, "-m", "flows.serve", "--limit", "4",
                                  "--set", f"data.root={p.data}", "--set", f"train.runs_dir={p.runs}"])
        names = {f"{fl.name}/{pf.DEPLOYMENT}" for fl in pf.FLOWS.values()}

        def served() -> bool:
            deps = p.post("/deployments/filter", {})
            flows = {f["id"]: f["name"] for f in p.post("/flows/filter", {})}
            return names <= {f"{flows.get(d['flow_id'])}/{d['name']}" for d in deps}

        p.wait_for("serve", served, 90, serve, root / "serve.log")
        p.timings["serve_s"] = time.monotonic() - t0
        yield p
    finally:
        for proc in reversed(p.procs):
            stop(proc)
        left = [proc.pid for proc in p.procs if group_alive(proc.pid)]
        # anything else started with this server's environment (flow-run processes, workers)
        home = f"PREFECT_HOME={p.env['PREFECT_HOME']}\n"
        strays = [pid for pid, env in our_processes().items() if home in env and pid != os.getpid()]
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        assert not left and not strays, f"left after teardown: groups {left}, processes {strays}"


# ------------------------------------------------------------------------------ cheap units
def test_parameters_merge_dotted_and_nested_keys():
    cfg = pf.resolve_config({"train.steps": 7, "model": {"latent_dim": 3},
                             "tune": {"space": {"train.beta": {"type": "float", "low": 0.5, "high": 2}}}})
    assert cfg.train.steps == 7 and cfg.model.latent_dim == 3
    assert cfg.model.decoder.hidden == 256  # a nested section is merged, not replaced
    assert list(cfg.tune.space) == ["train.beta"]  # the search space is replaced whole
    full = cfg.to_dict()
    assert pf.resolve_config(full, sets=["train.steps=99"]).to_dict() == full  # dispatch's full tree wins
    with pytest.raises(ConfigError, match=r"unknown key 'train.stepz' \(did you mean 'train.steps'\?\)"):
        pf.resolve_config({"train.stepz": 1})
    with pytest.raises(ConfigError, match="train.beta"):
        pf.resolve_config({"train": {"beta": -1}})


def test_a_validated_config_reaches_the_flows_as_it_is(tmp_path, monkeypatch):
    """Issue 18 #5: dispatch and the pipeline turned a Config into a dict and validated it again; now the
    object itself is passed on, and only a deployment's ``overrides`` are resolved."""
    from diffenc_core import config
    from flows import dispatch

    cfg = config.load(None, tiny("train.run=r", f"train.runs_dir={tmp_path}", f"data.root={tmp_path / 'data'}"))
    got: dict = {}
    monkeypatch.setattr(dispatch, "use_prefect", lambda: True)
    monkeypatch.setitem(pf.FLOWS, "train", lambda **kwargs: got.update(kwargs))
    dispatch.call("train", cfg, resume=True)
    assert got["config"] is cfg and "overrides" not in got

    def no_validation(*args, **kwargs):
        raise AssertionError("validated again")

    monkeypatch.setattr(config.Config, "model_validate", no_validation)
    assert pf._config(None, None, None, cfg) is cfg
    seen: list = []
    monkeypatch.setattr(pf, "_ensure_data", lambda c: None)
    monkeypatch.setattr(pf, "publish", lambda *a, **k: "")
    monkeypatch.setattr(pf, "train", lambda config, **kw: seen.append(("train", config)) or tmp_path / "r")
    monkeypatch.setattr(pf, "evaluate", lambda config, **kw: seen.append(("evaluate", config)) or {})
    pf.pipeline.fn(config=cfg)
    assert seen == [("train", cfg), ("evaluate", cfg)]  # one method, its run named as given: the same object
    with pytest.raises(ConfigError, match="give 'config' alone"):
        pf._config({"train.beta": 2}, None, None, cfg)


def test_only_transient_errors_are_retried():
    assert pf.is_transient(OSError("disk")) and pf.is_transient(ConnectionError())
    assert not pf.is_transient(ConfigError("bad")) and not pf.is_transient(ValueError("bug"))
    assert pf.train_task.retries == 2 and pf.train_task.retry_condition_fn is pf._retry_transient


def test_train_flow_starts_runs_exactly_like_the_cli(tmp_path):
    """Issue 12 #1/#7: one decision (diffenc_core.runstart) for the flow and `diffenc train`: a run
    with other settings is refused naming the keys, an existing run is never silently replaced;
    both before any work (the flow body runs here, without a server)."""
    from diffenc_core import checkpoint, runs, runstart
    from diffenc_core.config import dump
    from diffenc_core.errors import RunError

    over = {**tiny_overrides("r"), "train.runs_dir": str(tmp_path)}
    cfg = pf.resolve_config(over)
    assert not runstart.plan(cfg, "resume").resume  # nothing there yet: it starts, and says so
    run = runs.create(tmp_path, "r")
    dump(cfg, run.file(runs.PARAMS))
    checkpoint.save(run.checkpoint_dir / "last.pt", {"step": 7})
    longer = pf.resolve_config({**over, "train.steps": 500})
    assert runstart.plan(longer, "resume").message == "resuming r from step 7"  # a bigger budget continues it
    with pytest.raises(ConfigError, match="train.beta: 1.0 → 2.0"):
        pf.train.fn(overrides={**over, "train.beta": 2.0})  # resume=True, the default
    with pytest.raises(RunError, match="already holds a run"):
        pf.train.fn(overrides=over, resume=False)
    with pytest.raises(RunError, match="already holds a run"):
        pf.pipeline.fn(overrides=over, resume=False)


def test_the_train_flow_takes_the_number_of_processes(tmp_path, monkeypatch):
    """Issue 13: `nproc` is `train.nproc` (validated like it), handed on to the training task."""
    over = {**tiny_overrides("r"), "train.runs_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="train.nproc"):
        pf.train.fn(overrides=over, nproc=0)
    seen = []
    monkeypatch.setattr(pf, "_ensure_data", lambda cfg: None)
    monkeypatch.setattr(pf, "train_task", lambda cfg, **kw: seen.append(cfg.train.nproc) or tmp_path)
    monkeypatch.setattr(pf, "publish", lambda *a, **kw: "")
    assert pf.train.fn(overrides=over, nproc=2) == tmp_path and seen == [2]


def test_flow_parameters_cannot_steer_paths_out_of_the_runs_folder(tmp_path):
    """Issue 12 #3: flow parameters come from whoever reaches the server."""
    over = {**tiny_overrides("r"), "train.runs_dir": str(tmp_path / "runs")}
    with pytest.raises(ConfigError, match="train.run: must be one folder name"):
        pf.resolve_config({**over, "train.run": "../../escape"})
    with pytest.raises(ConfigError, match="run_dir: .* lies outside train.runs_dir"):
        pf.evaluate.fn(overrides=over, run_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="live_dir: .* lies outside train.runs_dir"):
        pf.train.fn(overrides=over, live_dir=str(tmp_path / "live"))
    with pytest.raises(ConfigError, match="params_file: .* is not a YAML params file"):
        pf.resolve_config(over, params_file="/etc/passwd")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "live").exists()


def test_tune_flow_resumes_a_study_from_its_name_alone(tmp_path, monkeypatch):
    """diffenc-tune/default given only ``study`` continues it with the settings it stored (issue 12,
    item 8): the flow's body runs here, its task inline, without a server."""
    import optuna

    from diffenc_core import config
    from flows import tuning

    monkeypatch.chdir(tmp_path)
    sets = tiny("data.dataset=linear_gaussian", "data.count=2000", "tune.trial_steps=5", "tune.report_every=5",
                "em.warmup_steps=2")
    tuning.run_study(config.load(None, sets), study="pf", n_trials=1)
    monkeypatch.setattr(pf, "tune_task", pf.tune_task.fn)
    monkeypatch.setattr(pf, "publish", lambda *args, **kwargs: None)
    summary = pf.tune.fn(study="pf", n_trials=2)  # the served defaults would be digits at full size
    assert summary["trials finished"] == 2
    study = optuna.load_study(study_name="pf", storage="sqlite:///runs/tune/pf.db")
    assert len(study.trials) == 2 and study.user_attrs["n_trials"] == 2
    second = config.load(Path(study.trials[1].user_attrs["run_path"], "params.yaml"))
    assert second.em.warmup_steps == 2 and second.data.dataset == "linear_gaussian"


def test_metrics_artifact_markdown():
    text = pf.metrics_table({"β=0.5": {"mse": 0.12345, "state": "done"}, "β=2": {"mse": 0.5}})
    assert text.splitlines()[0] == "| metric | β=0.5 | β=2 |"
    assert "| mse | 0.1235 | 0.5 |" in text and "| state | done |  |" in text
    assert pf.artifact_key("train", "Diffusion_beta0.5") == "diffenc-train-diffusion-beta0-5"


# ------------------------------------------------------------------------------ end to end
def flow_run_pids(flow_run_id: str) -> list[int]:
    """Processes started for a flow run (the runner passes its id in their environment)."""
    return [pid for pid, env in our_processes().items() if f"PREFECT__FLOW_RUN_ID={flow_run_id}" in env]


def test_train_deployment_completes_and_resumes_a_killed_run(prefect):
    """The Done-when round trip, through a kill: a training flow run's process is SIGKILLed after
    its first checkpoint; ``prefect deployment run … --watch`` with the same (tiny) parameters
    then ends Completed, continuing the run from its last checkpoint to a valid run directory."""
    t0 = time.monotonic()
    over = tiny_overrides("tiny", "train.steps=30", "train.checkpoint_every=5", "train.val_every=15")
    dep = prefect.request("GET", f"/deployments/name/diffenc-train/{pf.DEPLOYMENT}")
    first = prefect.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"overrides": over}})
    run = prefect.runs / "tiny"
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file():
        if time.monotonic() > deadline:
            state = prefect.request("GET", f"/flow_runs/{first['id']}")["state_name"]
            pytest.fail(f"no checkpoint after 120 s; flow run {state}:\n{tail(prefect.root / 'serve.log')}")
        time.sleep(0.05)
    pids = flow_run_pids(first["id"])
    assert pids, "the flow run's process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "running" and "steps" not in status  # killed mid-run
    t_kill = time.monotonic() - t0

    res = prefect.deployment_run("diffenc-train/default", {"overrides": over})
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Completed" in out, out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["steps"] == 30 and status["resumed_from"] >= 5, status
    assert last.is_file() and (run / "history.parquet").is_file() and (run / "params.yaml").is_file()
    assert (prefect.data / "digits" / "manifest.json").is_file()  # prepared on demand
    killed = prefect.request("GET", f"/flow_runs/{first['id']}")
    assert killed["state_type"] != "COMPLETED", killed["state_type"]  # the killed run never completed
    fr = next(r for r in prefect.flow_runs("diffenc-train") if r["state_type"] == "COMPLETED")
    logs = prefect.logs(fr["id"])
    assert "resuming" in logs and "tiny step 30/30 (100%)" in logs, logs  # progress in the flow logs
    arts = prefect.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["diffenc-train-tiny"]}}})
    assert arts and str(run) in arts[0]["data"] and "| val_neg_elbo |" in arts[0]["data"]
    print(f"timings: {prefect.timings} until killed {t_kill:.1f}s, resumed run {time.monotonic() - t0 - t_kill:.1f}s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_serve_stops_within_seconds_while_the_server_hangs(prefect, sig):
    """Issue 12 #5: `diffenc serve` once ignored SIGTERM and SIGINT for 25 s+ while the Prefect server
    was stopping too. Here the server is frozen (SIGSTOP) while a second serve process gets the signal:
    it must exit within its stop timeout, with status 128 + the signal."""
    from flows import serve as serve_mod

    name = f"serve-stop-{sig.name.lower()}"
    proc = prefect.start(name, [sys.executable, "-m", "flows.serve", "--set", f"data.root={prefect.data}",
                                "--set", f"train.runs_dir={prefect.runs}"])
    log = prefect.root / f"{name}.log"
    prefect.wait_for(name, lambda: "serving" in tail(log), 60, proc, log)
    time.sleep(SERVE_SETTLE_S)  # the runner registers its deployments and starts polling
    server = prefect.procs[0]
    os.killpg(server.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=serve_mod.STOP_TIMEOUT_S + STOP_SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {time.monotonic() - t0:.0f} s after {sig.name}:\n{tail(log)}")
        took = time.monotonic() - t0
    finally:
        os.killpg(server.pid, signal.SIGCONT)
    assert proc.returncode == 128 + sig, (proc.returncode, tail(log))
    print(f"serve stopped {took:.1f} s after {sig.name} with the server frozen")


SERVE_SETTLE_S = 3.0  # after "serving": time for the runner to register and poll once
STOP_SLACK_S = 3.0  # beyond serve's own stop timeout: process exit and scheduling


def test_bad_parameter_fails_with_the_message_and_writes_nothing(prefect):
    t0 = time.monotonic()
    bad = {**tiny_overrides("bad"), "train.stepz": 10, "data.root": str(prefect.root / "bad-data"),
           "train.runs_dir": str(prefect.root / "bad-runs")}
    res = prefect.deployment_run("diffenc-train/default", {"overrides": bad})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Failed" in out, out
    fr = next(r for r in prefect.flow_runs("diffenc-train") if r["state_type"] == "FAILED")
    logs = prefect.logs(fr["id"])
    assert "unknown key 'train.stepz' (did you mean 'train.steps'?)" in logs, logs
    assert not (prefect.root / "bad-data").exists() and not (prefect.root / "bad-runs").exists()
    print(f"bad parameter run {time.monotonic() - t0:.1f}s")


@pytest.fixture
def api(prefect, monkeypatch):
    """Flows called in this process talk to the shared server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect.api)
    with temporary_settings({PREFECT_API_URL: prefect.api}):
        try:
            yield prefect
        finally:  # send this process's queued logs and events while the server is still up
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)


def test_cli_dispatch_runs_the_flows(api):
    """With PREFECT_API_URL set the CLI's entry points run as flow runs (flows.dispatch)."""
    from prefect.logging.handlers import APILogWorker

    from diffenc_core.config import load
    from flows import dispatch

    t0 = time.monotonic()
    cfg = load(None, tiny("train.run=cli", f"data.root={api.data}", f"train.runs_dir={api.runs}"))
    assert dispatch.use_prefect()
    assert dispatch.call("prepare", cfg) == api.data / "digits"
    run_dir = dispatch.call("train", cfg, resume=True, progress=False)
    assert run_dir == api.runs / "cli"
    APILogWorker.drain_all(timeout=10)
    fr = next(r for r in api.flow_runs("diffenc-train") if r["name"] and r["state_type"] == "COMPLETED"
              and "has no run to resume" in api.logs(r["id"]))  # the library's own line, in the flow-run log
    assert fr
    metrics = dispatch.call("evaluate", cfg, run_dir=run_dir)
    assert metrics["method"] == "diffusion" and math.isfinite(metrics["neg_elbo_nats"])
    for name in ("diffenc-prepare", "diffenc-train", "diffenc-evaluate"):
        assert prefect_state(api, name, "COMPLETED")
    print(f"dispatch prepare+train+evaluate {time.monotonic() - t0:.1f}s")


def test_transient_errors_are_retried_and_user_errors_are_not(api, monkeypatch):
    """A flaky-disk OSError is retried (the retry resumes the run); a DiffencError is not."""
    from diffenc_core.errors import DataError
    from flows import entry

    calls: list[bool] = []

    def flaky(cfg, resume=False, **kwargs):
        calls.append(resume)
        if len(calls) == 1:
            raise OSError("flaky disk")
        return Path(cfg.train.runs_dir) / cfg.train.run_name

    monkeypatch.setattr(entry, "train_entry", flaky)
    monkeypatch.setattr(pf.train_task, "retry_delay_seconds", [0, 0])
    over = tiny_overrides("flaky", f"data.root={api.data}", f"train.runs_dir={api.runs}")
    assert pf.train(overrides=over) == api.runs / "flaky" and len(calls) == 2

    def broken(cfg, **kwargs):
        calls.append(True)
        raise DataError("train.parquet: not readable")

    calls.clear()
    monkeypatch.setattr(entry, "train_entry", broken)
    state = pf.train(overrides=over, return_state=True)
    assert state.is_failed() and "train.parquet: not readable" in state.message and len(calls) == 1


def prefect_state(p: Prefect, flow_name: str, state: str) -> bool:
    return any(r["state_type"] == state for r in p.flow_runs(flow_name))


def test_beta_sweep_fans_out_over_a_work_pool(api, monkeypatch):
    """At scale: the deployments registered on a process work pool (``diffenc serve --work-pool``),
    two ``prefect worker start --limit 1`` processes, and a β sweep whose runs (one flow run of the
    pipeline deployment per β) are each executed by a different worker, in parallel."""
    from flows import serve

    t0 = time.monotonic()
    pool = "diffenc-test"
    workers = [api.start(f"worker{i}", [PREFECT, "worker", "start", "--pool", pool, "--type", "process",
                                        "--limit", "1", "--name", f"w{i}"], cwd=api.root) for i in range(2)]
    monkeypatch.chdir(REPO)  # the pool's deployments load the code from the project folder
    names = serve.deploy_to_pool(pool, params=None, sets=[f"data.root={api.data}", f"train.runs_dir={api.runs}"],
                                 name="pool")
    assert "diffenc-pipeline/pool" in names and len(names) == len(pf.FLOWS)
    over = tiny_overrides("sw", "train.steps=10", "train.method=vae", f"data.root={api.data}",
                          f"train.runs_dir={api.runs}")
    state = pf.beta_sweep(overrides=over, betas=[0.5, 2.0],
                          deployment="diffenc-pipeline/pool", return_state=True)
    assert state.is_completed(), state
    children = [r for r in api.flow_runs("diffenc-pipeline") if r["name"].startswith("sw-beta")]
    assert sorted(r["name"] for r in children) == ["sw-beta0.5", "sw-beta2"]
    assert all(r["state_type"] == "COMPLETED" and r["parent_task_run_id"] for r in children)
    # a process worker streams its flow runs' output: which worker's log shows each run starting
    ran_on = {r["name"]: [i for i in range(2) if f" run={r['name']} " in tail(
        api.root / f"worker{i}.log", 10**7)] for r in children}
    assert sorted(sum(ran_on.values(), [])) == [0, 1], ran_on  # one β on each worker
    for beta in ("0.5", "2"):
        metrics = json.loads((api.runs / f"sw-beta{beta}" / "metrics.json").read_text())
        assert metrics["beta"] == float(beta) and metrics["method"] == "vae" and "neg_elbo_nats" in metrics
    arts = api.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["diffenc-beta-sweep-sw"]}}})
    assert arts and "| neg_elbo_nats |" in arts[0]["data"] and "β=0.5" in arts[0]["data"]
    starts = sorted(r["start_time"] for r in children)
    ends = sorted(r["end_time"] for r in children)
    assert all(w.poll() is None for w in workers)
    print(f"pool sweep {time.monotonic() - t0:.1f}s; children overlapped: {starts[-1] < ends[0]}")
