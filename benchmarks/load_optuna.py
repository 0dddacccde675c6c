"""Optuna under load (issue 19): ``diffenc tune --workers 4`` with 40 trials on each storage.

Runs the real command (``diffenc tune --study … --n-trials N --workers W --storage URL``) on
SQLite (the default, with heartbeats), an Optuna journal file and a PostgreSQL 15 server started
here, with tiny digits trials (so the load is on the storage and the workers, not torch), then reads
each study back and counts:

* finished (complete + pruned) against the target, lost (target not reached, or a failed trial
  whose parameters were never retried), duplicated (more finished trials than the target, a run
  folder used by two trials, or a run folder no trial owns), RUNNING left;
* "database is locked" in the command's output, the wall time, the load average;
* whether every storage proposed the same parameters (the sampler is seeded by the trial count).

    python -m benchmarks.load_optuna [--quick] [--storages sqlite journal postgres] [--workers 4] [--trials 40]

Writes ``benchmarks/results/load_optuna[_quick].json``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result
from benchmarks.servers import PostgresServer
from diffenc_core import config

REPO = Path(__file__).resolve().parents[1]
WORKERS, TRIALS = 4, 40
WORKERS_QUICK, TRIALS_QUICK = 2, 8
LOCKED = "database is locked"
TRIAL_SETS = [
    "data.dataset=digits", "train.method=diffusion", "train.batch_size=64", "train.log_every=10",
    "train.checkpoint_every=30", "model.latent_dim=4", "model.decoder.hidden=32", "model.encoder.hidden=32",
    "model.encoder.blocks=1", "model.encoder.x_embed_dim=16", "model.encoder.time_embed_dim=16",
    "em.langevin_steps=3", "em.warmup_steps=0", "em.vae_steps=0", "em.init_sampler_steps=3",
    "eval.sampler_steps=3", "eval.logq_steps=3", "eval.iwae_k=4", "eval.n_test=60",
    "tune.trial_steps=30", "tune.report_every=10", "tune.heartbeat_interval=2", "tune.grace_period=10",
]
SPACE = {
    "train.lr_encoder": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "em.step_size": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
}


def storage_for(kind: str, folder: Path, pg: PostgresServer | None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{folder / 'study.db'}"
    if kind == "journal":
        return str(folder / "study.log")
    assert pg is not None
    pg.create_database(folder.name)
    return pg.url(folder.name)


def run_tune(ws: Workspace, kind: str, url: str, folder: Path, workers: int, trials: int) -> dict[str, Any]:
    """The real ``diffenc tune`` command on ``url``; its output, exit status and wall time."""
    cfg = config.with_overrides(
        config.load(None, [*TRIAL_SETS, f"data.root={ws.root / 'data'}", f"train.runs_dir={folder / 'runs'}"]),
        {"tune.space": SPACE})
    params = folder / "params.yaml"
    config.dump(cfg, params)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(folder)}
    cmd = [str(Path(sys.executable).parent / "diffenc"), "tune", "--params", str(params), "--study", "load",
           "--n-trials", str(trials), "--workers", str(workers), "--storage", url]
    loads = []
    t0 = time.monotonic()
    with open(folder / "tune.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            loads.append(os.getloadavg()[0])
            time.sleep(2)
    wall = time.monotonic() - t0
    text = (folder / "tune.log").read_text(errors="replace")
    print(f"[{kind}] exit {proc.returncode} in {wall:.0f} s", flush=True)
    return {"exit": proc.returncode, "wall_s": wall, "locked": text.count(LOCKED),
            "tracebacks": text.count("Traceback"), "load1_mean": sum(loads) / max(1, len(loads)),
            "load1_max": max(loads, default=0.0)}


def audit(url: str, folder: Path, trials: int) -> dict[str, Any]:
    """Read the study back: finished, lost, duplicated, RUNNING left, and its parameters in order."""
    import optuna
    from optuna.trial import TrialState

    from flows.tuning.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="load", storage=make_storage(config.Config(), url, heartbeat=False))
    all_trials = study.trials
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in all_trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
    retried = {t.user_attrs.get("retry_of") for t in all_trials}
    paths = [t.user_attrs.get("run_path") for t in all_trials if t.user_attrs.get("run_path")]
    on_disk = {str(p.parent.resolve()) for p in (folder / "runs").rglob("status.json")}
    owned = {str(Path(p).resolve()) for p in paths}
    return {
        "trials": len(all_trials), "finished": len(finished),
        "pruned": sum(t.state == TrialState.PRUNED for t in finished),
        "failed": len(failed), "running_left": sum(t.state == TrialState.RUNNING for t in all_trials),
        "lost": max(0, trials - len(finished)) + sum(t.number not in retried for t in failed),
        "duplicated": max(0, len(finished) - trials) + (len(paths) - len(set(paths))) + len(on_disk - owned),
        "workers_seen": len({t.user_attrs.get("pid") for t in all_trials}),
        "params": [sorted(t.params.items()) for t in sorted(finished, key=lambda t: t.number)],
    }


COLUMNS = ["storage", "workers", "target", "finished", "pruned", "lost", "duplicated", "running_left", "failed",
           "locked", "tracebacks", "exit", "wall_s", "same_params_as_first", "load1_mean", "load1_max"]


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--storages", nargs="+", default=["sqlite", "journal", "postgres"],
                    choices=["sqlite", "journal", "postgres"])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    args = ap.parse_args()
    workers = args.workers or (WORKERS_QUICK if args.quick else WORKERS)
    trials = args.trials or (TRIALS_QUICK if args.quick else TRIALS)
    timer = Timer()
    ws = Workspace(args.keep)
    ws.prepare(*TRIAL_SETS)
    rows = []
    pg = PostgresServer().start() if "postgres" in args.storages else None
    try:
        for kind in args.storages:
            folder = ws.root / f"tune_{kind}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            url = storage_for(kind, folder, pg)
            row = {"storage": kind, "workers": workers, "target": trials,
                   **run_tune(ws, kind, url, folder, workers, trials), **audit(url, folder, trials)}
            rows.append(row)
    finally:
        if pg is not None:
            pg.stop()
    for row in rows:
        row["same_params_as_first"] = row["params"] == rows[0]["params"]
    print(f"\n## diffenc tune: {workers} workers × {trials} trials per storage\n")
    print(table(rows, COLUMNS, 3))
    res = {"profile": "quick" if args.quick else "full", "workers": workers, "trials": trials,
           "load_average_start": timer.load_start, "rows": rows, "wall_seconds": timer.seconds}
    print("wrote", write_result("load_optuna", res, args.quick))
    if not args.keep:
        shutil.rmtree(ws.root, ignore_errors=True)


if __name__ == "__main__":
    main()
