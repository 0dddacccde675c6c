"""Prefect under load (issue 19): many ``diffenc-train`` flow runs queued at once on ``diffenc serve``.

For each database (the Prefect server's own SQLite, or a PostgreSQL 15 server started here) and
each variant, starts a Prefect server on loopback, serves the deployments, creates ``--runs``
flow runs of ``diffenc-train/default`` at once (tiny digits trainings, so the load is on the
fronts, not torch), samples their states every few seconds until every run is final, and reports:

* Completed / Failed / Crashed, and whether every run folder is whole (status ``done``, its steps,
  history, checkpoint);
* the most runs labelled ``Late`` at once, and the samples where a slot was idle while runs waited
  (fewer runs Pending/Running than the limit) or where none ran at all while runs waited;
* the drain time (first run created → last run final) and the server log's errors
  ("database is locked", tracebacks);
* the load average during the run.

Variants: ``serve`` (``diffenc serve`` with its defaults: ``--limit`` from the machine, polling
every ``flows.serve.RUNNER_POLL_S``), ``serve:poll=10`` (Prefect's own poll interval), and
``pool:poll=S`` (the deployments on a process work pool whose concurrency limit is the same
limit, one ``prefect worker`` polling every S s).

    python -m benchmarks.load_prefect [--quick] [--db sqlite postgres] [--variants serve ...]
                                      [--runs 50] [--out NAME]

Writes ``benchmarks/results/<NAME>[_quick].json`` (NAME defaults to ``load_prefect``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result
from benchmarks.servers import PostgresServer, PrefectServer, stop_group
from flows import serve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_RUNS, N_RUNS_QUICK = 50, 12
SAMPLE_S = 3.0
SERVE_READY_S = 180
RUN_BUDGET_S = 60  # drain deadline: this much per run and slot, on top of a fixed margin
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
WAITING = "SCHEDULED"  # Scheduled, Late and AwaitingConcurrencySlot are all of this state type
ACTIVE = {"PENDING", "RUNNING"}
LOG_ERRORS = {"database is locked": "database is locked", "Traceback": "Traceback (most recent call last)"}
# a tiny digits training: seconds of torch, so the flow-run processes and the server carry the load
TRAIN_SETS = [
    "data.dataset=digits", "train.method=diffusion", "train.steps=30", "train.batch_size=64", "train.log_every=10",
    "train.val_every=30", "train.checkpoint_every=30", "model.latent_dim=4", "model.decoder.hidden=32",
    "model.encoder.hidden=32", "model.encoder.blocks=1", "model.encoder.x_embed_dim=16",
    "model.encoder.time_embed_dim=16", "em.langevin_steps=3", "em.warmup_steps=0", "em.vae_steps=0",
    "em.init_sampler_steps=3",
]


def parse_variant(spec: str) -> dict[str, Any]:
    """``serve``, ``serve:poll=10``, ``pool:poll=2`` → {"via", "poll"} (poll None: the default)."""
    via, _, rest = spec.partition(":")
    if via not in ("serve", "pool"):
        raise SystemExit(f"--variants {spec}: expected serve[:poll=S] or pool[:poll=S]")
    poll = float(rest.split("=", 1)[1]) if rest.startswith("poll=") else None
    return {"name": spec, "via": via, "poll": poll}


def overrides(run: str) -> dict[str, Any]:
    from diffenc_core.config import parse_overrides

    return parse_overrides([*TRAIN_SETS, f"train.run={run}"])


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(what: str, check, proc: subprocess.Popen | None, log: Path, timeout: float = SERVE_READY_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def front_end(server: PrefectServer, variant: dict[str, Any], limit: int, sets: list[str],
              logs: Path) -> list[subprocess.Popen]:
    """``diffenc serve`` (or a work pool with a concurrency limit and one worker) serving the deployments."""
    env = dict(server.env)
    diffenc = str(BIN / "diffenc")
    if variant["via"] == "serve":
        if variant["poll"] is not None:
            env[serve.POLL_ENV] = f"{variant['poll']:g}"
        proc = start([diffenc, "serve", *sum((["--set", s] for s in sets), [])], env, logs / "serve.log")
        wait_for("diffenc serve", lambda: "serving" in (logs / "serve.log").read_text(), proc, logs / "serve.log")
        return [proc]
    pool = "load"
    server.post("/work_pools/", {"name": pool, "type": "process", "concurrency_limit": limit})
    res = subprocess.run([diffenc, "serve", "--work-pool", pool, *sum((["--set", s] for s in sets), [])],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=SERVE_READY_S)
    if res.returncode:
        raise RuntimeError(f"diffenc serve --work-pool failed:\n{res.stdout}{res.stderr}")
    if variant["poll"] is not None:
        env["PREFECT_WORKER_QUERY_SECONDS"] = f"{variant['poll']:g}"
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", "w0"],
                   env, logs / "worker.log")
    return [worker]


def sample(server: PrefectServer, ids: list[str], limit: int, t0: float) -> dict[str, Any]:
    rows = server.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}, "limit": len(ids)})
    names: dict[str, int] = {}
    types: dict[str, int] = {}
    for r in rows:
        names[r["state_name"]] = names.get(r["state_name"], 0) + 1
        types[r["state_type"]] = types.get(r["state_type"], 0) + 1
    waiting = types.get(WAITING, 0)
    active = sum(types.get(t, 0) for t in ACTIVE)
    return {"t": time.monotonic() - t0, "names": names, "types": types, "waiting": waiting, "active": active,
            "running": types.get("RUNNING", 0), "late": names.get("Late", 0),
            "final": sum(types.get(t, 0) for t in FINAL), "idle_slot": waiting > 0 and active < limit,
            "none_running": waiting > 0 and types.get("RUNNING", 0) == 0, "load1": os.getloadavg()[0]}


def whole(runs_dir: Path, run: str) -> bool:
    """The run finished all its steps and kept its files."""
    import json

    d = runs_dir / run
    try:
        status = json.loads((d / "status.json").read_text())
    except (OSError, ValueError):
        return False
    steps = int(next(s.split("=")[1] for s in TRAIN_SETS if s.startswith("train.steps=")))
    return (status.get("state") == "done" and status.get("steps") == steps and (d / "history.parquet").is_file()
            and (d / "checkpoints" / "last.pt").is_file())


def log_errors(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {key: text.count(needle) for key, needle in LOG_ERRORS.items()}


def measure(db: str, variant: dict[str, Any], n: int, limit: int, ws: Workspace) -> dict[str, Any]:
    """One queue of ``n`` train flow runs on a fresh server; its figures."""
    tag = f"{db}-{variant['name'].replace(':', '-').replace('=', '')}"
    logs = ws.root / tag
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    runs_dir = logs / "runs"
    sets = [f"data.root={ws.root / 'data'}", f"train.runs_dir={runs_dir}"]
    pg = PostgresServer().start() if db == "postgres" else None
    procs: list[subprocess.Popen] = []
    server = None
    try:
        db_url = None
        if pg is not None:
            pg.create_database("prefect")
            db_url = pg.url("prefect", "postgresql+asyncpg")
        server = PrefectServer(db_url, root=logs).start()
        procs = front_end(server, variant, limit, sets, logs)
        dep = wait_for("the diffenc-train deployment", lambda: server.deployment_id("diffenc-train/default"),
                       procs[0], logs / ("serve.log" if variant["via"] == "serve" else "worker.log"))
        print(f"[{tag}] queueing {n} flow runs (limit {limit})", flush=True)
        t0 = time.monotonic()
        ids = [server.post(f"/deployments/{dep}/create_flow_run",
                           {"parameters": {"overrides": overrides(f"q{i:03d}")}})["id"] for i in range(n)]
        queued_s = time.monotonic() - t0
        samples = []
        deadline = t0 + 120 + RUN_BUDGET_S * n / limit
        while True:
            s = sample(server, ids, limit, t0)
            samples.append(s)
            print(f"[{tag}] {s['t']:6.0f} s  {s['names']}  load {s['load1']:.1f}", flush=True)
            if s["final"] == n or time.monotonic() > deadline:
                break
            time.sleep(SAMPLE_S)
        drain_s = samples[-1]["t"]
        final = server.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}, "limit": n})
    finally:
        for proc in reversed(procs):
            stop_group(proc, signal.SIGTERM, 15)
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()
    states = {k: sum(r["state_type"] == k for r in final) for k in ("COMPLETED", "FAILED", "CRASHED")}
    waiting = [s for s in samples if s["waiting"]]
    errors = log_errors(logs / "server.log")
    result = {
        "db": db, "variant": variant["name"], "runs": n, "limit": limit, **{k.lower(): v for k, v in states.items()},
        "not_final": n - sum(r["state_type"] in FINAL for r in final),
        "whole_run_folders": sum(whole(runs_dir, f"q{i:03d}") for i in range(n)),
        "max_late": max(s["late"] for s in samples), "samples": len(samples), "samples_waiting": len(waiting),
        "idle_slot_samples": sum(s["idle_slot"] for s in samples),
        "none_running_samples": sum(s["none_running"] for s in samples),
        "queue_s": queued_s, "drain_s": drain_s, "server_db_locked": errors["database is locked"],
        "server_tracebacks": errors["Traceback"], "load1_mean": sum(s["load1"] for s in samples) / len(samples),
        "load1_max": max(s["load1"] for s in samples), "timeline": samples,
    }
    if not os.environ.get("DIFFENC_KEEP_LOAD_LOGS"):
        shutil.rmtree(runs_dir, ignore_errors=True)
    return result


COLUMNS = ["db", "variant", "runs", "limit", "completed", "failed", "crashed", "whole_run_folders", "max_late",
           "samples_waiting", "idle_slot_samples", "none_running_samples", "drain_s", "server_db_locked",
           "server_tracebacks", "load1_mean", "load1_max"]


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--variants", nargs="+", default=["serve"], help="serve, serve:poll=S, pool:poll=S")
    ap.add_argument("--runs", type=int, default=None, help=f"flow runs queued (default {N_RUNS}, quick {N_RUNS_QUICK})")
    ap.add_argument("--limit", type=int, default=None, help="slots (default: diffenc serve's default here)")
    ap.add_argument("--out", default="load_prefect", help="result name")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    n = args.runs or (N_RUNS_QUICK if args.quick else N_RUNS)
    limit = args.limit or serve.default_limit()
    timer = Timer()
    ws = Workspace(args.keep)
    ws.prepare(*TRAIN_SETS)  # once, before the queue: 50 runs would otherwise race to prepare it
    rows = [measure(db, v, n, limit, ws) for db in args.db for v in variants]
    print(f"\n## {n} diffenc-train flow runs queued at once\n")
    print(table(rows, COLUMNS, 3))
    res = {"profile": "quick" if args.quick else "full", "runs": n, "limit": limit, "sample_s": SAMPLE_S,
           "load_average_start": timer.load_start, "rows": rows, "wall_seconds": timer.seconds,
           "default_poll_s": serve.RUNNER_POLL_S,
           "command": "python -m benchmarks.load_prefect" + "".join(" " + a for a in sys.argv[1:])}
    print("wrote", write_result(args.out, res, args.quick))
    if not args.keep:
        shutil.rmtree(ws.root, ignore_errors=True)


if __name__ == "__main__":
    main()
