"""Dashboard scale (issue 12 item 9): how long the dashboard takes to draw over a big runs folder.

Trains and evaluates one small digits run with the ``diffenc`` library, copies it (without its
checkpoints) into ``--runs`` run directories, then drives the real app with Streamlit's AppTest,
as one browser tab would, and times each script run:

* first render (Runs page, cold caches), a rerun of the same page, then switching to every other
  page (Latents, Reconstructions and Training with ``--selected`` runs compared);
* the Runs page again after one run's ``metrics.json`` changed (the index must pick it up);
* a second session (a new browser tab) on the now warm process.

    python -m benchmarks.dashboard_scale [--runs 1000] [--quick] [--keep DIR] [--before OLD.json]

``--before`` puts the times of an earlier result file (e.g. one measured before a change) next to
the new ones. Writes ``benchmarks/results/dashboard_scale[_quick].json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result
from dashboard.index import SCAN_REUSE_S
from diffenc_core import runs

N_RUNS = 1000
N_RUNS_QUICK = 200
N_SELECTED = 3
APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
APPTEST_TIMEOUT_S = 600  # one script run; the unindexed dashboard needed ~16 s per page at 1 000 runs
TARGET_FIRST_S = 3.0  # the aim: first render
TARGET_SWITCH_S = 1.0  # the aim: every later page switch
CHANGE_WAIT_S = 2 * SCAN_REUSE_S  # then the next render rescans the folder instead of reusing a scan
CHANGE_TOL = 1e-9
# a small but complete digits run: every file the dashboard reads, in seconds of training
SOURCE_SETS = [
    "data.dataset=digits", "train.method=diffusion", "train.run=source", "train.steps=40",
    "train.log_every=5", "train.val_every=20", "train.checkpoint_every=20", "em.warmup_steps=0",
    "em.langevin_steps=3", "em.init_sampler_steps=3", "model.encoder.blocks=1", "model.encoder.hidden=64",
    "model.decoder.hidden=64", "eval.sampler_steps=3", "eval.rate_steps=10", "eval.refine_steps=3",
    "eval.iwae_k=4",
]
# (step, page, runs compared before it); None keeps the comparison as it is
STEPS: list[tuple[str, str, int | None]] = [
    ("first render (Runs)", "views/runs.py", 0),
    ("rerun Runs", "views/runs.py", None),
    ("→ Rate–distortion", "views/rate_distortion.py", None),
    ("→ Latents", "views/latents.py", N_SELECTED),
    ("→ Reconstructions", "views/reconstructions.py", None),
    ("→ Training", "views/training.py", None),
    ("→ Tuning", "views/tuning.py", None),
    ("→ Runs", "views/runs.py", None),
]


def build_folder(ws: Workspace, n: int) -> Path:
    """``n`` copies of one real, evaluated digits run (no checkpoints) under ``<workspace>/scale``."""
    ws.prepare(*SOURCE_SETS)
    source = Path(ws.train_and_evaluate(*SOURCE_SETS)["run_dir"])
    root = ws.root / "scale"
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        shutil.copytree(source, root / f"run_{i:04d}", ignore=shutil.ignore_patterns(runs.CHECKPOINTS))
    return root


def _timed(at: Any, label: str, page: str, first: bool) -> dict[str, Any]:
    """Run one step (the first run of a session opens the app; later ones switch page) and time it."""
    t0 = time.perf_counter()
    at.run() if first else at.switch_page(page).run()
    dt = time.perf_counter() - t0
    errors = [str(e.value)[:200] for e in at.exception]
    drawn = {"table_rows": len(at.dataframe[0].value) if at.dataframe else 0, "charts": len(at.get("plotly_chart")),
             "images": len(at.image), "warnings": len(at.warning)}
    print(f"  {label:<34} {dt:7.2f} s  {drawn}" + (f"  EXCEPTION {errors}" if errors else ""), flush=True)
    return {"step": label, "seconds": dt, "exceptions": errors, **drawn}


def new_session(root: Path) -> Any:
    """An AppTest session (one browser tab) over ``root`` with nothing compared yet."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=APPTEST_TIMEOUT_S)
    at.session_state["runs_dir"] = str(root)
    at.session_state["compare"] = []
    return at


def walk(at: Any, ids: list[str], steps: list[tuple[str, str, int | None]], fresh: bool) -> list[dict[str, Any]]:
    """Take ``at`` through ``steps``; the seconds of each script run."""
    out = []
    for i, (label, page, n_compare) in enumerate(steps):
        if n_compare is not None:
            at.session_state["compare"] = ids[:n_compare]
        out.append(_timed(at, label, page, first=fresh and i == 0))
    return out


def touch_one(root: Path) -> tuple[str, float]:
    """Rewrite one run's metrics.json with a new ELBO, as a re-evaluation would; (run, new ELBO)."""
    run = runs.Run(root / "run_0000")
    m = run.metrics()
    m["elbo_nats"] = float(m.get("elbo_nats") or 0.0) - 1.0
    run.write_metrics(m)
    return run.name, m["elbo_nats"]


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--runs", type=int, default=None, help=f"run directories (default {N_RUNS}, quick {N_RUNS_QUICK})")
    ap.add_argument("--selected", type=int, default=N_SELECTED, help="runs compared on the per-run pages")
    ap.add_argument("--before", default=None, help="an earlier result file to compare against")
    args = ap.parse_args()
    n = args.runs or (N_RUNS_QUICK if args.quick else N_RUNS)
    steps = [(lab, page, args.selected if k == N_SELECTED else k) for lab, page, k in STEPS]
    timer = Timer()
    ws = Workspace(args.keep)
    t0 = time.perf_counter()
    root = build_folder(ws, n)
    build_s = time.perf_counter() - t0
    ids = sorted(p.name for p in root.iterdir())
    print(f"{n} run directories under {root} (built in {build_s:.0f} s)\n\nfirst session:", flush=True)
    res: dict[str, Any] = {"profile": "quick" if args.quick else "full", "n_runs": n, "selected": args.selected,
                           "load_average_start": timer.load_start, "build_seconds": build_s}
    at = new_session(root)
    res["steps"] = walk(at, ids, steps, fresh=True)
    time.sleep(CHANGE_WAIT_S)
    changed, elbo = touch_one(root)
    print(f"after {changed}/metrics.json changed:")
    res["steps"] += walk(at, ids, [("Runs, one run changed", "views/runs.py", None)], fresh=False)
    shown = at.dataframe[0].value.set_index("id")["elbo_nats"].get(changed) if at.dataframe else None
    res["change_seen"] = shown is not None and abs(float(shown) - elbo) < CHANGE_TOL
    print(f"  the change is shown: {res['change_seen']}")
    print("second session (new tab, warm process):")
    res["steps"] += walk(new_session(root), ids, [("new tab: first render", "views/runs.py", 0),
                                                  ("new tab: → Latents", "views/latents.py", args.selected)],
                         fresh=True)
    switches = [s["seconds"] for s in res["steps"][1:len(steps)]]
    res["first_render_s"] = res["steps"][0]["seconds"]
    res["max_switch_s"] = max(switches)
    res["targets"] = {"first_render_s": TARGET_FIRST_S, "switch_s": TARGET_SWITCH_S}
    res["meets_targets"] = res["first_render_s"] <= TARGET_FIRST_S and res["max_switch_s"] <= TARGET_SWITCH_S
    res["exceptions"] = sum(len(s["exceptions"]) for s in res["steps"])
    cols = ["step", "seconds"]
    if args.before:
        before = json.loads(Path(args.before).read_text())
        old = {s["step"]: s["seconds"] for s in before.get("steps", [])}
        for s in res["steps"]:
            s["before_seconds"] = old.get(s["step"])
        res["before"] = {"file": args.before, "commit": before.get("machine", {}).get("commit"),
                         "load_average_start": before.get("load_average_start")}
        cols.append("before_seconds")
    print(f"\n## Dashboard over {n} runs (AppTest, {args.selected} runs compared)\n")
    print(table(res["steps"], cols, 3))
    print(f"\nfirst render {res['first_render_s']:.2f} s (aim ≤ {TARGET_FIRST_S} s), slowest switch "
          f"{res['max_switch_s']:.2f} s (aim ≤ {TARGET_SWITCH_S} s), exceptions: {res['exceptions']}")
    res["wall_seconds"] = timer.seconds
    print("wrote", write_result("dashboard_scale", res, args.quick))
    if not args.keep:
        shutil.rmtree(ws.root, ignore_errors=True)


if __name__ == "__main__":
    main()
