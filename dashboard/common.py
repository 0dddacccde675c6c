"""Shared state and tolerant, cached reading of run directories for every dashboard page.

Everything here reads through ``diffenc_core.runs`` (the run-directory contract) and never
raises on a broken run: unreadable files come back as ``None`` plus a list of problems that
the pages show as warnings.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.settings import RUNS_DIR_ENV, STORAGE_ENV  # noqa: F401 (re-exported)
from diffenc_core import runs

# session_state keys shared across pages
K_RUNS_DIR = "runs_dir"
K_COMPARE = "compare"  # list of run ids (paths relative to the runs folder) selected for comparison

# the final metrics shown by default in the runs table (others can be switched on)
DEFAULT_METRICS = [
    "elbo_nats", "rate_nats", "distortion_nats", "mse_amortised", "mse_refined", "psnr_refined_db",
    "sync_gap_nats", "langevin_accept", "active_units", "aggregate_kl_to_prior_nats",
]
KEY_PARAMS = {
    "steps": ("train", "steps"),
    "e_step": ("em", "e_step"),
    "langevin_steps": ("em", "langevin_steps"),
    "lr_encoder": ("train", "lr_encoder"),
    "sampler": ("eval", "sampler"),
    "seed": ("train", "seed"),
}
BASE_COLUMNS = ["id", "health", "state", "method", "dataset", "beta", "latent_dim"]
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]


# ---------------------------------------------------------------------------------- runs folder
def default_runs_dir() -> str:
    return os.environ.get(RUNS_DIR_ENV) or "runs"


def runs_root() -> Path:
    return Path(st.session_state.get(K_RUNS_DIR) or default_runs_dir()).expanduser()


def run_path(run_id: str, root: Path | None = None) -> Path:
    return (root or runs_root()) / run_id


def _stamp(path: Path) -> tuple[int, int] | None:
    """A cache key that changes whenever the file does (mtime, size); None when absent."""
    try:
        s = path.stat()
    except OSError:
        return None
    return s.st_mtime_ns, s.st_size


# ------------------------------------------------------------------------------- the runs table
def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows from metrics files as a display table: non-scalars become text, all-empty columns go."""
    df = pd.DataFrame([{k: _scalar(v) for k, v in r.items()} for r in rows])
    for c in df.columns:
        if df[c].map(lambda v: isinstance(v, str)).any() and df[c].map(lambda v: isinstance(v, int | float)).any():
            df[c] = df[c].astype("string")
    return df.dropna(axis=1, how="all")


def _dig(tree: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree


STALE_MINUTES = 30


def _quiet_minutes(run: runs.Run) -> float | None:
    """Minutes since the run last wrote its status or history (None when neither exists)."""
    stamps = [p.stat().st_mtime for p in (run.file(runs.STATUS), run.file(runs.HISTORY)) if p.exists()]
    return (time.time() - max(stamps)) / 60 if stamps else None


def build_runs_table(root: str | Path) -> pd.DataFrame:
    """One row per run below ``root``; a run that cannot be read becomes a row with its problem."""
    root = Path(root)
    rows: list[dict[str, Any]] = []
    for run in runs.find_runs(root):
        try:
            rid = run.path.relative_to(root).as_posix()
        except ValueError:
            rid = str(run.path)
        try:
            row = run.summary()
            params = run.params()
        except Exception as err:  # a run we cannot even summarise is still listed
            row, params = {"run": str(run.path), "name": run.name, "state": "unknown"}, {}
            run.problems.append(f"unreadable ({err.__class__.__name__}: {err})")
        status = run.status()
        row = {k: _scalar(v) for k, v in row.items() if not isinstance(v, list | dict)}
        for col, keys in KEY_PARAMS.items():
            row.setdefault(col, _scalar(_dig(params, *keys)))
        if isinstance(status.get("steps"), int):
            row["steps"] = status["steps"]
        row["id"] = rid
        problems = list(dict.fromkeys(run.problems))
        state = row.get("state") or "unknown"
        if not run.file(runs.STATUS).exists():
            problems.append("status.json: missing")
        if state == "done" and not run.file(runs.METRICS).exists():
            problems.append("metrics.json: missing (not evaluated yet)")
        if state == "running":
            quiet = _quiet_minutes(run)
            if quiet is not None and quiet > STALE_MINUTES:
                problems.append(f"status says running but nothing was written for {quiet:.0f} min "
                                "(killed or crashed?)")
        if state == "failed":
            problems.insert(0, f"failed: {row.get('error') or 'no error recorded'}")
        row["problems"] = "; ".join(problems) or None
        row["health"] = "attention" if problems else ("running" if state == "running" else "ok")
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*BASE_COLUMNS, "problems"])
    df = pd.DataFrame(rows)
    for col in df.columns:  # a corrupt metrics.json may put text in a numeric column
        if col in ("id", "run", "name", "method", "dataset", "state", "started", "finished", "error",
                   "problems", "health", "e_step", "sampler"):
            continue
        num = pd.to_numeric(df[col], errors="coerce")
        if num.notna().sum() >= df[col].notna().sum() * 0.5 and num.notna().any():
            df[col] = num
        else:
            df[col] = df[col].astype("string")
    for col in ("method", "dataset", "state", "e_step", "sampler"):
        if col in df:
            df[col] = df[col].astype("string")
    first = [c for c in [*BASE_COLUMNS, *KEY_PARAMS] if c in df]
    return df[first + [c for c in df.columns if c not in first]].sort_values("id").reset_index(drop=True)


@st.cache_data(ttl=3, max_entries=8, show_spinner=False)
def _cached_runs_table(root: str) -> pd.DataFrame:
    return build_runs_table(root)


def runs_table() -> pd.DataFrame:
    return _cached_runs_table(str(runs_root()))


def run_label(run_id: str, table: pd.DataFrame | None = None) -> str:
    table = runs_table() if table is None else table
    row = table[table["id"] == run_id]
    if row.empty:
        return run_id
    r = row.iloc[0]
    bits = [str(v) for v in (r.get("method"), r.get("dataset")) if isinstance(v, str)]
    beta = r.get("beta")
    if isinstance(beta, int | float) and not (isinstance(beta, float) and math.isnan(beta)):
        bits.append(f"β={beta:g}")
    return f"{run_id} ({', '.join(bits)})" if bits else run_id


# ----------------------------------------------------------------------------- per-run reading
@st.cache_data(max_entries=512, show_spinner=False)
def _read_table(path: str, name: str, stamp: Any) -> tuple[pd.DataFrame | None, list[str]]:
    run = runs.Run(Path(path))
    if stamp is None:
        return None, [f"{name}: missing"]
    df = run.table(name)
    return df, list(run.problems)


def read_table(run_id: str, name: str) -> tuple[pd.DataFrame | None, list[str]]:
    """A run's Parquet table (None plus the reason when missing or unreadable)."""
    p = run_path(run_id)
    return _read_table(str(p), name, _stamp(p / name))


@st.cache_data(max_entries=512, show_spinner=False)
def _read_json(path: str, name: str, stamp: Any) -> tuple[dict[str, Any], list[str]]:
    run = runs.Run(Path(path))
    obj = run.metrics() if name == runs.METRICS else run.status()
    return obj, list(run.problems)


def read_metrics(run_id: str) -> tuple[dict[str, Any], list[str]]:
    p = run_path(run_id)
    return _read_json(str(p), runs.METRICS, _stamp(p / runs.METRICS))


def read_status(run_id: str) -> dict[str, Any]:
    p = run_path(run_id)
    return _read_json(str(p), runs.STATUS, _stamp(p / runs.STATUS))[0]


@st.cache_data(max_entries=256, show_spinner=False)
def _read_params(path: str, stamp: Any) -> tuple[dict[str, Any], list[str]]:
    run = runs.Run(Path(path))
    return run.params(), list(run.problems)


def read_params(run_id: str) -> dict[str, Any]:
    p = run_path(run_id)
    return _read_params(str(p), _stamp(p / runs.PARAMS))[0]


def plot_files(run_id: str) -> list[Path]:
    d = run_path(run_id) / runs.PLOTS
    return sorted(d.glob("*.png")) if d.is_dir() else []


# ------------------------------------------------------------------------------ the comparison
def prune_compare(valid_ids: list[str]) -> None:
    """Drop selected runs that no longer exist (call before the selection widget is drawn)."""
    cur = st.session_state.get(K_COMPARE) or []
    st.session_state[K_COMPARE] = [r for r in cur if r in set(valid_ids)]


def page_runs(title: str) -> tuple[pd.DataFrame, list[str]]:
    """A comparison page's header: its title, the runs table and the chosen runs (stops if none)."""
    st.title(title)
    table = runs_table()
    chosen = selected_runs(table)
    if not chosen:
        st.info("Select runs to compare on the **Runs** page (or in the sidebar).")
        st.stop()
    return table, chosen


def selected_runs(table: pd.DataFrame | None = None, fallback: int = 3) -> list[str]:
    """The runs chosen for comparison; with none chosen, the latest few finished runs (and say so)."""
    table = runs_table() if table is None else table
    chosen = [r for r in st.session_state.get(K_COMPARE) or [] if r in set(table["id"])]
    if chosen or table.empty:
        return chosen
    ok = table[(table["state"] == "done") & table["problems"].isna()]
    if "finished" in ok:
        ok = ok.sort_values("finished", ascending=False, na_position="last")
    pick = list(ok["id"][:fallback])
    if pick:
        st.info(f"No runs selected for comparison — showing the {len(pick)} most recent finished run(s). "
                "Pick runs on the **Runs** page or in the sidebar.")
    return pick


def colours(run_ids: list[str]) -> dict[str, str]:
    """One stable colour per compared run, the same on every page."""
    order = list(st.session_state.get(K_COMPARE) or [])
    order += [r for r in run_ids if r not in order]
    return {r: PALETTE[order.index(r) % len(PALETTE)] for r in run_ids}


def digest(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------- robustness
@contextmanager
def guard(what: str) -> Iterator[None]:
    """Show a warning instead of a crash when one section cannot be drawn (e.g. a corrupt table)."""
    try:
        yield
    except Exception as err:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        st.warning(f"{what}: could not be shown ({err.__class__.__name__}: {err})", icon=":material/warning:")


def warn_problems(run_id: str, problems: list[str], what: str = "") -> None:
    for p in dict.fromkeys(problems):
        st.warning(f"**{run_id}**{' ' + what if what else ''}: {p}", icon=":material/warning:")
