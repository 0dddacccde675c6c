"""The "Under load" section of BENCHMARKS.md, from the load benchmarks' result files (issue 19).

    python -m benchmarks.load_report        # prints the Markdown

``section()`` returns the same lines for ``benchmarks.run_all``. It reads ``load_optuna``,
``load_prefect``, ``load_prefect_modes`` and ``load_dashboard`` (``*_quick`` when the full profile's
file is absent) from ``benchmarks/results/``; a missing file is named, not an error.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import RESULTS, table

COMMANDS = {  # result name -> the command that writes it
    "load_optuna": "python -m benchmarks.load_optuna",
    "load_prefect": "python -m benchmarks.load_prefect",
    "load_prefect_modes": "python -m benchmarks.load_prefect --db sqlite --runs 16 --variants serve:poll=10 serve "
                          "pool:poll=2 --out load_prefect_modes",
    "load_dashboard": "python -m benchmarks.load_dashboard",
}


def _load(name: str) -> tuple[str, dict[str, Any]] | None:
    for stem in (name, f"{name}_quick"):
        path = RESULTS / f"{stem}.json"
        if path.exists():
            return stem, json.loads(path.read_text())
    return None


def _la(v: list[float] | None) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _where(stem: str, res: dict[str, Any]) -> str:
    m = res["machine"]
    return (f"`{res.get('command', stem)}` · commit `{m['commit']}` · {m['cores']} cores · load average "
            f"{_la(res.get('load_average_start'))} at start, {_la(m.get('load_average'))} at end · "
            f"wall {res.get('wall_seconds', 0):.0f} s")


def optuna_lines(stem: str, res: dict[str, Any]) -> list[str]:
    rows = res["rows"]
    return [
        f"**Optuna: `diffenc tune --workers {res['workers']}`, {res['trials']} trials on each storage** "
        "(tiny digits trials; the real command; the study read back afterwards). *lost*: target not reached, or a "
        "failed trial never retried; *duplicated*: finished trials beyond the target, or a run folder used twice "
        "or owned by no trial; *locked*: \"database is locked\" in the command's output; load: the 1-minute load "
        "average while it ran.", "", _where(stem, res), "",
        table(rows, ["storage", "finished", "pruned", "lost", "duplicated", "running_left", "failed", "locked",
                     "tracebacks", "exit", "wall_s", "load1_mean"], 3), "",
        "The proposals agree between storages until TPE leaves its random start-up trials (seeded by the trial "
        "count): after that they depend on which trials had finished, i.e. on timing.",
    ]


def prefect_lines(stem: str, res: dict[str, Any], title: str) -> list[str]:
    return [
        title, "", _where(stem, res), "",
        table(res["rows"], ["db", "variant", "runs", "limit", "completed", "failed", "crashed", "whole_run_folders",
                            "max_late", "samples_waiting", "idle_slot_samples", "none_running_samples", "drain_s",
                            "server_db_locked", "server_tracebacks", "load1_mean"], 3),
    ]


def modes_summary(rows: list[dict[str, Any]]) -> list[str]:
    """What the comparison of the ways to wait for a slot says, from its rows."""
    share = ", ".join(f"{r['variant']} {r['idle_slot_samples'] / max(1, r['samples_waiting']):.0%}" for r in rows)
    late = ", ".join(f"{r['variant']} {r['max_late']}" for r in rows)
    return [
        f"Samples with an idle slot among those where runs waited: {share}. Most runs labelled *Late* at once: "
        f"{late} — the server's late-runs service marks any Scheduled run 15 s past its time, whether a runner's or a "
        "work pool's limit holds it back, so no variant avoids the label. A work pool frees its slot when the run is "
        "Completed (the next run starts while the last one's process exits); a runner frees its own when the process "
        "has exited. `diffenc serve` keeps serving from one process (no pool to create) with the shorter poll; the "
        "work pool stays the way to spread runs over machines.",
    ]


def dashboard_lines(stem: str, res: dict[str, Any]) -> list[str]:
    loads = len(res["loads"])
    split = "script_p95_s" in res["pages"][0]  # measured since the script run and the drawing are told apart
    cpu = (f" CPU while driving ({res['drive_seconds']:.0f} s): the app's server {res['server_cpu_s']:.0f} s, "
           f"the browser {res['browser_cpu_s']:.0f} s." if "server_cpu_s" in res else "")
    return [
        f"**Dashboard: {res['n_runs']} runs, {res['sessions']} Chromium sessions at once**, each opening the app "
        f"and walking every page {res['rounds']} time(s); a load lasts from the click until the page's script run "
        "has finished and every chart and image has drawn"
        + (" (*script*: until the page saw its script run finish)." if split else "."), "", _where(stem, res), "",
        table(res["pages"], ["page", "loads", "median_s", "p95_s", "max_s",
                             *(["script_median_s", "script_p95_s"] if split else [])], 3), "",
        f"{loads}/{res['expected_loads']} page loads; errors in the pages: {len(res['page_errors'])}; in the server "
        f"log: {len(res['server_errors'])}; load average while driving {res['load1_mean']:.1f} (max "
        f"{res['load1_max']:.1f}); every page's 95th percentile ≤ {res['target_p95_s']:g} s: "
        f"{'yes' if res['meets_target'] else 'no'}.{cpu}",
    ]


def section() -> list[str]:
    """The Markdown lines of the section (its ``##`` heading included)."""
    out = ["## Under load: tuning workers, queued flow runs, concurrent dashboard sessions", ""]
    found = {name: _load(name) for name in COMMANDS}
    if found["load_optuna"]:
        out += [*optuna_lines(*found["load_optuna"]), ""]
    if found["load_prefect"]:
        stem, res = found["load_prefect"]
        out += [*prefect_lines(stem, res, (
            f"**Prefect: {res['runs']} `diffenc-train` flow runs queued at once on `diffenc serve`** with its "
            "defaults (limit from the machine, poll every 2 s), on the server's own SQLite and on PostgreSQL 15. "
            f"States sampled every {res['sample_s']:g} s: *waiting* = Scheduled or Late; *idle slot* = a sample "
            "with fewer runs Pending/Running than the limit while runs waited; *none running* = no run in Running "
            "while runs waited (a run's process starting up is Pending). A run folder is *whole* when its status "
            "is done at its steps, with its history and checkpoint.")), ""]
    if found["load_prefect_modes"]:
        stem, res = found["load_prefect_modes"]
        out += [*prefect_lines(stem, res, (
            f"**Which way keeps the slots busy** ({res['runs']} runs, limit {res['limit']}, SQLite): the runner "
            "polling every 10 s (Prefect's default), every 2 s (`diffenc serve`'s default now), and a process work "
            "pool with a concurrency limit served by one `prefect worker` polling every 2 s.")), "",
                *modes_summary(res["rows"]), ""]
    for stem in ("load_dashboard", "load_dashboard_quick"):  # the quick profile splits server and browser time
        path = RESULTS / f"{stem}.json"
        if path.exists():
            out += [*dashboard_lines(stem, json.loads(path.read_text())), ""]
    missing = [n for n, v in found.items() if v is None]
    if missing:
        out += [f"Not measured yet: {', '.join(f'`{COMMANDS[n]}`' for n in missing)}.", ""]
    return out


if __name__ == "__main__":
    print("\n".join(section()))
