"""Shared state and tolerant, cached reading of run directories for every dashboard page.

Everything here reads through ``diffenc_core.runs`` (the run-directory contract) and never
raises on a broken run: unreadable files come back as ``None`` plus a list of problems that
the pages show as warnings. The runs table comes from ``dashboard.index`` (one per folder, shared
by the server's sessions), which re-reads only the runs whose files changed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import index
from dashboard.settings import RUNS_DIR_ENV, STORAGE_ENV  # noqa: F401 (re-exported)
from diffenc_core import runs

# session_state keys shared across pages
K_RUNS_DIR = "runs_dir"
K_COMPARE = "compare"  # list of run ids (paths relative to the runs folder) selected for comparison

# the final metrics shown by default in the runs table (others can be switched on)
DEFAULT_METRICS = [
    "elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "ais_log_px_nats", "n_ais", "ais_gap_nats", "rate_nats",
    "distortion_nats", "mse_amortised", "mse_refined", "sync_gap_nats", "active_units",
]
KEY_PARAMS = index.KEY_PARAMS
BASE_COLUMNS = index.BASE_COLUMNS
MAX_INDEXES = 8  # runs folders whose index the server keeps (the sidebar can switch folders)
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]


# ---------------------------------------------------------------------------------- runs folder
def default_runs_dir() -> str:
    return os.environ.get(RUNS_DIR_ENV) or "runs"


def runs_root() -> Path:
    return Path(st.session_state.get(K_RUNS_DIR) or default_runs_dir()).expanduser()


def run_path(run_id: str, root: Path | None = None) -> Path:
    return (root or runs_root()) / run_id


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """A cache key that changes whenever the file does (mtime, size, inode: an atomic replace is a new
    inode); None when absent."""
    try:
        s = path.stat()
    except OSError:
        return None
    return s.st_mtime_ns, s.st_size, s.st_ino


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


def build_runs_table(root: str | Path) -> pd.DataFrame:
    """One row per run below ``root``, read afresh; a run that cannot be read becomes a row with its problem."""
    return index.RunIndex(root).table()


@st.cache_resource(max_entries=MAX_INDEXES, show_spinner=False)
def run_index(root: str) -> index.RunIndex:
    """The server-wide index of one runs folder, shared by every session and page."""
    return index.RunIndex(root)


def runs_table() -> pd.DataFrame:
    """The runs table of the sidebar's folder: only runs whose files changed since the last call are re-read."""
    return run_index(str(runs_root())).table()


def reload() -> None:
    """Forget everything read so far (the "Reload runs" button)."""
    st.cache_data.clear()
    run_index.clear()


def run_labels(table: pd.DataFrame) -> dict[str, str]:
    """``id (method, dataset, β)`` for every run of ``table``, for pickers over many runs."""
    n = len(table)

    def col(name: str) -> list[Any]:
        return list(table[name]) if name in table else [None] * n

    out = {}
    for rid, method, dataset, beta in zip(table["id"], col("method"), col("dataset"), col("beta"), strict=True):
        bits = [str(v) for v in (method, dataset) if isinstance(v, str)]
        if isinstance(beta, int | float) and not (isinstance(beta, float) and math.isnan(beta)):
            bits.append(f"β={beta:g}")
        out[rid] = f"{rid} ({', '.join(bits)})" if bits else rid
    return out


def run_label(run_id: str, table: pd.DataFrame | None = None) -> str:
    table = runs_table() if table is None else table
    return run_labels(table[table["id"] == run_id]).get(run_id, run_id)


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
    valid = set(valid_ids)
    st.session_state[K_COMPARE] = [r for r in cur if r in valid]


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
    known = set(table["id"])
    chosen = [r for r in st.session_state.get(K_COMPARE) or [] if r in known]
    if chosen or table.empty:
        return chosen
    ok = table[table["health"] == index.OK] if "health" in table else table.iloc[:0]
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


MISSING = ": missing"  # how diffenc_core.runs and this module word an absent file
EMPTY = ": empty"  # a table with no rows yet (a run that has just started)
NEUTRAL = {index.NOT_EVALUATED, index.RUNNING, index.INTERRUPTED}  # health with nothing wrong to warn about


def explain_missing(run_id: str, problems: list[str], what: str, table: pd.DataFrame) -> None:
    """Say why a compared run has nothing to show: a neutral note when it is simply not evaluated yet
    (or still running, or interrupted) and its files are just absent; a warning when a file is broken."""
    row = table[table["id"] == run_id]
    health = str(row["health"].iloc[0]) if len(row) and "health" in row else None
    state = str(row["state"].iloc[0]) if len(row) and "state" in row else read_status(run_id).get("state", "unknown")
    if health in NEUTRAL and all(p.endswith((MISSING, EMPTY)) for p in problems):
        why = {index.NOT_EVALUATED: "not evaluated yet", index.RUNNING: "still running",
               index.INTERRUPTED: "interrupted"}[health]
        st.info(f"**{run_id}** — {what}: {why}", icon=":material/hourglass_empty:")
        return
    warn_problems(run_id, problems, f"({state}) — {what}")
