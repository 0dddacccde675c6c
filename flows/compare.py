"""Side-by-side comparison of evaluated runs (diffusion encoder vs VAE, or a beta sweep).

``compare_entry`` reads runs only through :mod:`diffenc_core.runs` and writes, into ``out``:

- ``comparison.md``   the table a person reads: one column per run, one row per metric
- ``comparison.csv``  one row per run (DVC plots: rate against distortion)
- ``comparison.json`` ``{run name: {metric: value}}`` for scripts
- ``rate_distortion.png``  the runs in the rate–distortion plane

The output depends only on the runs' files (no timestamps, paths relative as given), so
re-running it over the same runs rewrites the same bytes: ``dvc status`` stays clean.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from diffenc_core import runs
from diffenc_core.config import Config
from diffenc_core.errors import ConfigError, RunError, writing

OUT_NAME = "comparison"
MD, CSV, JSON, RD_PNG = "comparison.md", "comparison.csv", "comparison.json", "rate_distortion.png"

AIS_X = "ais_test_x"  # "k of n": the test x the AIS estimate and its gaps use (the bounds use all n)
ID_COLUMNS = ["name", "method", "dataset", "beta", "latent_dim"]
# Shown first and in this order where present; any other scalar metric follows, sorted.
PREFERRED = [
    "elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "ais_log_px_nats", AIS_X, "ais_gap_nats",
    "ais_gap_exact_logq_nats", "ais_gap_iwae_32_nats", "elbo_base_only_nats",
    "neg_elbo_nats", "rate_nats", "distortion_nats", "rate_exact_logq_nats",
    "rate_score_integral_nats", "mse_amortised", "mse_refined", "psnr_amortised_db", "psnr_refined_db",
    "sync_gap_nats", "langevin_accept", "active_units", "aggregate_kl_to_prior_nats", "probe_accuracy",
    "encode_seconds_per_1000", "encoder_nfe", "sigma_x",
]
LOWER_IS_BETTER = ("neg_elbo_nats", "distortion_nats", "mse_amortised", "mse_refined", "sync_gap_nats", "ais_gap_nats",
                   "ais_gap_exact_logq_nats", "ais_gap_iwae_32_nats")
HIGHER_IS_BETTER = ("elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "ais_log_px_nats")
SKIP_METRICS = {"method", "beta", "latent_dim", "n_test", "n_iwae", "n_importance", "refine_steps", "n_ais",
                "n_ais_check", "ais_temperatures", "ais_check_temperatures", "ais_rounds", "exact_logq_seconds"}


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def stale_note(run: runs.Run) -> str | None:
    """A note when the run's metrics.json is older than its last checkpoint: it trained further after it was
    evaluated (a resume drops the old evaluation; a run from before that, or files copied in, may not)."""
    try:
        stale = run.file(runs.METRICS).stat().st_mtime_ns < (run.checkpoint_dir / "last.pt").stat().st_mtime_ns
    except OSError:
        return None
    if not stale:
        return None
    return (f"{run.path}: metrics.json is older than checkpoints/last.pt (trained further since its evaluation); "
            f"its metrics are stale: run `diffenc evaluate --run {run.path}`")


def _select(runs_dir: Path, chosen: list[Path] | None) -> tuple[list[runs.Run], list[str]]:
    """The evaluated runs to compare, and a note for each run left out or with stale metrics."""
    selected, notes = _evaluated(runs_dir, chosen)
    notes += [note for run in selected if (note := stale_note(run)) is not None]
    return selected, notes


def _evaluated(runs_dir: Path, chosen: list[Path] | None) -> tuple[list[runs.Run], list[str]]:
    notes: list[str] = []
    if chosen:
        selected = [runs.open_run(p) for p in chosen]
        for run in selected:
            if "rate_nats" not in run.metrics():
                raise RunError(f"{run.path}: not evaluated (no usable metrics.json) — run `diffenc evaluate --run "
                               f"{run.path}` first")
        return selected, notes
    found = runs.find_runs(runs_dir)
    selected = []
    for run in found:
        metrics = run.metrics()
        if "rate_nats" in metrics:
            selected.append(run)
        else:
            state = run.status().get("state", "unknown")
            notes.append(f"{run.path}: skipped (not evaluated; status {state})")
    if not selected:
        raise RunError(f"{runs_dir}: no evaluated runs to compare — run `dvc repro` (or `diffenc train` and "
                       "`diffenc evaluate`) first")
    return selected, notes


def comparison_table(selected: list[runs.Run]) -> pd.DataFrame:
    """One row per run: identity columns, then the scalar metrics (preferred ones first)."""
    rows = []
    for run in selected:
        summary = run.summary()
        metrics = run.metrics()
        row = {k: summary.get(k) for k in ID_COLUMNS}
        row["name"] = run.name
        row["method"] = row["method"] or metrics.get("method")
        row["beta"] = row["beta"] if row["beta"] is not None else metrics.get("beta")
        row.update({k: v for k, v in metrics.items() if _scalar(v) and k not in SKIP_METRICS})
        if _scalar(metrics.get("n_ais")) and _scalar(metrics.get("n_test")):
            row[AIS_X] = f"{metrics['n_ais']} of {metrics['n_test']}"
        rows.append(row)
    table = pd.DataFrame(rows)
    metric_cols = [c for c in table.columns if c not in ID_COLUMNS]
    ordered = [c for c in PREFERRED if c in metric_cols]
    ordered += sorted(c for c in metric_cols if c not in ordered)
    table = table[ID_COLUMNS + ordered]
    return table.sort_values(["method", "beta", "name"], na_position="last", kind="stable").reset_index(drop=True)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _side_by_side(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Metrics as rows, runs as columns; the better of each lower-is-better row marked with *."""
    header = ["metric", *(str(n) for n in table["name"])]
    body = []
    for col in table.columns:
        if col == "name":
            continue
        values = list(table[col])
        cells = [_fmt(v) for v in values]
        if col in LOWER_IS_BETTER + HIGHER_IS_BETTER and len(values) > 1:
            finite = [v for v in values if _scalar(v) and math.isfinite(v)]
            if finite:
                best = min(finite) if col in LOWER_IS_BETTER else max(finite)
                cells = [c + " *" if _scalar(v) and v == best else c for c, v in zip(cells, values, strict=True)]
        body.append([col, *cells])
    return header, body


def to_markdown(table: pd.DataFrame) -> str:
    header, body = _side_by_side(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    note = ("\n\n`*` marks the better value of a metric where one direction is better; nats are per example "
            "(ELBO / IWAE / AIS log p(x): higher is better; `ais_gap_*` = AIS log p(x) − that bound, the "
            "encoder's own gap: lower is better). AIS log p(x) and the `ais_gap_*` use the first "
            f"`{AIS_X}` test x (`eval.ais_n`); the bounds above them use all test x.\n")
    return "# Comparison of evaluated runs\n\n" + "\n".join(lines) + note


def _print(table: pd.DataFrame, notes: list[str], out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    header, body = _side_by_side(table)
    rt = Table(*header, title="diffusion encoder vs VAE: evaluated runs side by side")
    for row in body:
        rt.add_row(*row)
    console.print(rt)
    for note in notes:
        console.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
    if out is not None:
        console.print(f"wrote [bold]{out / MD}[/], {CSV}, {JSON} and {RD_PNG}", highlight=False, soft_wrap=True)


def write_outputs(table: pd.DataFrame, out: Path) -> None:
    """The markdown, CSV, JSON and rate–distortion PNG, each written atomically."""
    from diffenc_core import plots

    with writing(out, "choose another --out"):
        out.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(out / MD, to_markdown(table))
    runs.atomic_write_text(out / CSV, table.to_csv(index=False, float_format="%.6g"))
    records = {r["name"]: {k: v for k, v in r.items() if k != "name" and not _missing(v)}
               for r in table.to_dict("records")}
    runs.atomic_write_text(out / JSON, json.dumps(records, indent=2, sort_keys=True, default=_plain) + "\n")
    plots.rate_distortion(table, out / RD_PNG)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def compare_entry(
    cfg: Config,
    runs_dir: Path | None = None,
    out: Path | None = None,
    run_dirs: list[Path] | None = None,
    show: bool = True,
) -> pd.DataFrame:
    """Compare evaluated runs and write the table and rate–distortion plot into ``out``.

    ``runs_dir`` defaults to ``train.runs_dir`` and ``out`` to ``<runs_dir>/comparison``.
    ``run_dirs`` picks run directories explicitly (the DVC stage does, so its inputs are exactly
    its declared deps); otherwise every evaluated run below ``runs_dir`` is compared and the
    others are listed as skipped.
    """
    root = Path(runs_dir) if runs_dir is not None else Path(cfg.train.runs_dir)
    out = Path(out) if out is not None else root / OUT_NAME
    inside = runs.enclosing_run(out)
    if inside is not None:  # its files would become part of that run (and block replacing it)
        raise ConfigError(f"--out: {out} is inside the run {inside}; the comparison needs a folder of its own "
                          f"(default: <runs_dir>/{OUT_NAME})")
    selected, notes = _select(root, run_dirs)
    table = comparison_table(selected)
    write_outputs(table, out)
    if show:
        _print(table, notes, out)
    return table
