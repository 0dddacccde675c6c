"""An index of run summaries that scales with the runs folder (issue 12 item 9).

Each call walks the folder with ``os.scandir`` and stats only the files a summary depends on
(no file is opened: ~30 ms for 1 000 runs); a run is re-read through ``diffenc_core.runs`` only
when one of those stamps changed, and the assembled table is reused while the folder's state is
the same. No Streamlit here: ``dashboard.common`` keeps one index per folder for the server.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dashboard import optuna_io
from diffenc_core import runs

# the files whose (mtime, size, inode) decide whether a run's summary must be re-read
STAMPED = (runs.STATUS, runs.PARAMS, runs.METRICS, runs.HISTORY)
STORAGE_SUFFIXES = optuna_io.SQLITE_SUFFIXES + optuna_io.JOURNAL_SUFFIXES  # files that may be Optuna storages
SCAN_REUSE_S = 0.5  # a scan this recent is reused: the sidebar and the page of one script run share it
STALE_MINUTES = 30  # a "running" run that wrote nothing for this long was probably killed

# the health column: what the Runs page shows for a run, from neutral to "look at this"
OK, RUNNING, NOT_EVALUATED, INTERRUPTED, ATTENTION = "ok", "running", "not evaluated", "interrupted", "attention"
NOT_EVALUATED_NOTE = "not evaluated yet (diffenc evaluate --run <run dir>)"
INTERRUPTED_NOTE = "interrupted (diffenc train --resume continues it)"

KEY_PARAMS = {
    "steps": ("train", "steps"),
    "e_step": ("em", "e_step"),
    "langevin_steps": ("em", "langevin_steps"),
    "lr_encoder": ("train", "lr_encoder"),
    "sampler": ("eval", "sampler"),
    "seed": ("train", "seed"),
}
BASE_COLUMNS = ["id", "health", "state", "method", "dataset", "beta", "latent_dim"]
TEXT_COLUMNS = ("id", "run", "name", "method", "dataset", "state", "started", "finished", "error", "problems",
                "note", "health", "e_step", "sampler")
STRING_COLUMNS = ("method", "dataset", "state", "e_step", "sampler")
NUMERIC_SHARE = 0.5  # a column becomes numeric when at least this share of its values are numbers

Stamp = tuple[int, int, int] | None
Stamps = tuple[Stamp, ...]


# ------------------------------------------------------------------------------- the scan
@dataclass(frozen=True)
class Scan:
    """What one walk of the runs folder saw: every run with its stamps, and Optuna storage candidates."""

    runs: tuple[tuple[str, str, Stamps], ...]  # (run id, absolute path, stamps of STAMPED), sorted by id
    storages: tuple[str, ...]  # files whose suffix an Optuna storage may have
    at: float  # time.monotonic() of the walk


def _stamp(entry: os.DirEntry | None) -> Stamp:
    if entry is None:
        return None
    try:
        s = entry.stat()
    except OSError:  # deleted between the listing and the stat
        return None
    return s.st_mtime_ns, s.st_size, s.st_ino


def scan(root: str | Path) -> Scan:
    """Every run directory below ``root`` (as ``runs.find_runs`` finds them) and its file stamps.

    A run is a folder holding status.json or params.yaml; ``checkpoints/`` and a run's ``plots/``
    are not descended into, nor are symlinked folders (as ``Path.rglob``).
    """
    root = Path(root)
    found: list[tuple[str, str, Stamps]] = []
    storages: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = {e.name: e for e in it}
        except OSError:  # vanished, or not a folder
            continue
        is_run = runs.STATUS in entries or runs.PARAMS in entries
        if is_run:
            rel = folder.relative_to(root).as_posix()
            found.append((rel, str(folder), tuple(_stamp(entries.get(n)) for n in STAMPED)))
        for name, e in entries.items():
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if name != runs.CHECKPOINTS and not (is_run and name == runs.PLOTS):
                    stack.append(folder / name)
            elif name.lower().endswith(STORAGE_SUFFIXES):
                storages.append(e.path)
    found.sort()
    return Scan(tuple(found), tuple(sorted(storages)), time.monotonic())


# -------------------------------------------------------------------------- reading one run
class _ReadOnce(runs.Run):
    """A ``runs.Run`` whose files are parsed once per summary (``summary()`` and the key parameters
    share one parse)."""

    def __init__(self, path: Path) -> None:
        super().__init__(Path(path))
        self._memo: dict[str, Any] = {}

    def _once(self, key: str, read: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = read()
        return self._memo[key]

    def status(self) -> dict[str, Any]:
        return self._once(runs.STATUS, super().status)

    def metrics(self) -> dict[str, Any]:
        return self._once(runs.METRICS, super().metrics)

    def params(self) -> dict[str, Any]:
        return self._once(runs.PARAMS, super().params)


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _dig(tree: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(k)
    return tree


@dataclass(frozen=True)
class Summary:
    """One run's row of the runs table, plus what the table needs to judge its health later."""

    row: dict[str, Any]  # scalar columns (final metrics, key parameters, state …)
    problems: tuple[str, ...]  # broken, unreadable or missing files: the run needs attention
    state: str
    evaluated: bool  # metrics.json exists
    quiet_since_ns: int | None  # newest mtime of status.json / history.parquet (stale "running" runs)


def summarise(rid: str, path: str | Path, stamps: Stamps) -> Summary:
    """Read one run through ``diffenc_core.runs``; never raises (a broken run is a row with problems)."""
    run = _ReadOnce(Path(path))
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
    row.pop("problems", None)
    problems = list(dict.fromkeys(run.problems))
    stamp = dict(zip(STAMPED, stamps, strict=True))
    if stamp[runs.STATUS] is None:
        problems.append(f"{runs.STATUS}: missing")
    quiet = [s[0] for s in (stamp[runs.STATUS], stamp[runs.HISTORY]) if s is not None]
    state = row.get("state") or "unknown"
    return Summary(row, tuple(problems), str(state), stamp[runs.METRICS] is not None,
                   max(quiet) if quiet else None)


# ------------------------------------------------------------------------------- the table
def health(s: Summary, now_ns: int) -> tuple[str, list[str], str | None]:
    """(health, problems, neutral note) of one run at time ``now_ns``."""
    problems = list(s.problems)
    if s.state == "running" and s.quiet_since_ns is not None:
        quiet = (now_ns - s.quiet_since_ns) / 60e9
        if quiet > STALE_MINUTES:
            problems.append(f"status says running but nothing was written for {quiet:.0f} min (killed or crashed?)")
    if s.state == "failed":
        problems.insert(0, f"failed: {s.row.get('error') or 'no error recorded'}")
    if problems:
        return ATTENTION, problems, None
    if s.state == "running":
        return RUNNING, problems, None
    if s.state == "interrupted":
        return INTERRUPTED, problems, INTERRUPTED_NOTE
    if s.state == "done" and not s.evaluated:
        return NOT_EVALUATED, problems, NOT_EVALUATED_NOTE
    return OK, problems, None


def _stale_minutes(summaries: list[Summary], now_ns: int) -> tuple[int, ...]:
    """Whole minutes of silence of every stale "running" run: part of the table's cache key."""
    out = []
    for s in summaries:
        if s.state == "running" and s.quiet_since_ns is not None:
            quiet = (now_ns - s.quiet_since_ns) / 60e9
            if quiet > STALE_MINUTES:
                out.append(round(quiet))
    return tuple(out)


def assemble(summaries: list[Summary], now_ns: int | None = None) -> pd.DataFrame:
    """The runs table: one row per run, health judged now, columns typed for display and sorting."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    rows = []
    for s in summaries:
        h, problems, note = health(s, now_ns)
        rows.append({**s.row, "problems": "; ".join(problems) or None, "note": note, "health": h})
    if not rows:
        return pd.DataFrame(columns=[*BASE_COLUMNS, "problems", "note"])
    df = pd.DataFrame(rows)
    for col in df.columns:  # a corrupt metrics.json may put text in a numeric column
        if col in TEXT_COLUMNS:
            continue
        num = pd.to_numeric(df[col], errors="coerce")
        if num.notna().sum() >= df[col].notna().sum() * NUMERIC_SHARE and num.notna().any():
            df[col] = num
        else:
            df[col] = df[col].astype("string")
    for col in STRING_COLUMNS:
        if col in df:
            df[col] = df[col].astype("string")
    first = [c for c in [*BASE_COLUMNS, *KEY_PARAMS] if c in df]
    return df[first + [c for c in df.columns if c not in first]].sort_values("id").reset_index(drop=True)


class RunIndex:
    """The runs table of one folder, kept up to date cheaply: unchanged runs are never re-read.

    ``reads`` counts the runs summarised so far (a test hook: a second call over an unchanged
    folder adds none). Safe to share between the server's sessions (one lock).
    """

    def __init__(self, root: str | Path, reuse_s: float = SCAN_REUSE_S) -> None:
        self.root = Path(root)
        self.reuse_s = reuse_s
        self.reads = 0
        self._summaries: dict[str, tuple[Stamps, Summary]] = {}
        self._scan: Scan | None = None
        self._key: tuple | None = None
        self._table: pd.DataFrame | None = None
        self._lock = threading.Lock()

    def scan(self) -> Scan:
        """The folder's current state (a scan younger than ``reuse_s`` is reused)."""
        with self._lock:
            if self._scan is None or time.monotonic() - self._scan.at > self.reuse_s:
                self._scan = scan(self.root)
            return self._scan

    def table(self) -> pd.DataFrame:
        """The runs table (a copy: callers may change it freely)."""
        state = self.scan()
        with self._lock:
            fresh: dict[str, tuple[Stamps, Summary]] = {}
            for rid, path, stamps in state.runs:
                hit = self._summaries.get(rid)
                if hit is None or hit[0] != stamps:
                    hit = (stamps, summarise(rid, path, stamps))
                    self.reads += 1
                fresh[rid] = hit
            self._summaries = fresh  # runs that vanished are forgotten
            summaries = [s for _, s in fresh.values()]
            now_ns = time.time_ns()
            key = (tuple((rid, stamps) for rid, _, stamps in state.runs), _stale_minutes(summaries, now_ns))
            if key != self._key or self._table is None:
                self._table, self._key = assemble(summaries, now_ns), key
            return self._table.copy()

    def storages(self) -> tuple[str, ...]:
        """Files below the folder that may be Optuna storages (SQLite or journal), from the last scan."""
        return self.scan().storages
