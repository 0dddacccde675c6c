"""Finding and reading Optuna storages (read-only use: the dashboard never creates or writes a study)."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
JOURNAL = "journal:"
RUN_ATTRS = ("run_dir", "run", "run_path")


def normalise(spec: str) -> str:
    """A storage URL, or a file path turned into ``sqlite:///abs`` / ``journal:/abs``."""
    spec = spec.strip()
    if "://" in spec or spec.startswith(JOURNAL):
        return spec
    p = Path(spec).expanduser().resolve()
    return f"sqlite:///{p}" if p.suffix.lower() in SQLITE_SUFFIXES else f"{JOURNAL}{p}"


def shown(spec: str) -> str:
    """A storage as the pages print it: a database password masked (``postgresql://me:***@host/db``)."""
    if "://" not in spec:
        return spec
    try:
        from sqlalchemy.engine import make_url

        return make_url(spec).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: it holds no password it could mask
        return spec


def _is_optuna_sqlite(path: Path) -> bool:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return {"studies", "trials"} <= names


def _is_journal(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
        return "op_code" in json.loads(first)
    except (OSError, ValueError, TypeError):
        return False


def discover(runs_dir: str | Path, limit: int = 50, candidates: Iterable[str | Path] | None = None) -> list[str]:
    """Optuna storages (SQLite files, journal files) inside the runs folder, as normalised specs.

    ``candidates`` (e.g. the files the run index saw) spares walking the whole folder again.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    paths = sorted(root.rglob("*")) if candidates is None else sorted(Path(c) for c in candidates)
    found: list[str] = []
    for p in paths:
        if len(found) >= limit:
            break
        if "checkpoints" in p.parts or not p.is_file():
            continue
        suffix = p.suffix.lower()
        if suffix in SQLITE_SUFFIXES and _is_optuna_sqlite(p):
            found.append(normalise(str(p)))
        elif suffix in JOURNAL_SUFFIXES and _is_journal(p):
            found.append(normalise(str(p)))
    return found


def open_storage(spec: str) -> Any:
    """An Optuna storage object; a missing SQLite/journal file is an error, never silently created."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    spec = normalise(spec)
    if spec.startswith(JOURNAL):
        path = Path(spec[len(JOURNAL):])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such journal file")
        return JournalStorage(JournalFileBackend(str(path)))
    if spec.startswith("sqlite:///"):
        path = Path(spec[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such SQLite file")
    return optuna.storages.RDBStorage(spec, skip_compatibility_check=False)


def study_summaries(storage: Any) -> pd.DataFrame:
    import optuna

    rows = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        rows.append({"study": s.study_name, "trials": s.n_trials,
                     "direction": ",".join(d.name.lower() for d in s.directions),
                     "started": s.datetime_start})
    return pd.DataFrame(rows, columns=["study", "trials", "direction", "started"])


def run_id_for(attr: Any, runs_dir: Path, known_ids: set[str]) -> str | None:
    """Map a trial's recorded run path to a run id (a path relative to the runs folder)."""
    if not isinstance(attr, str) or not attr:
        return None
    root = runs_dir.resolve()
    p = Path(attr).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, root / p, root.parent / p]
    for c in candidates:
        try:
            rid = c.resolve().relative_to(root).as_posix()
        except ValueError:
            continue
        if rid in known_ids:
            return rid
    return None


def trials_frame(trials: list[Any], runs_dir: Path, known_ids: set[str]) -> pd.DataFrame:
    rows = []
    for t in trials:
        attr = next((t.user_attrs.get(a) for a in RUN_ATTRS if t.user_attrs.get(a)), None)
        values = t.values or []
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name,
                               "value": values[0] if len(values) == 1 else None}
        for i, v in enumerate(values if len(values) > 1 else []):
            row[f"value_{i}"] = v
        dur = t.duration.total_seconds() if t.duration is not None else None
        row["duration_s"] = round(dur, 2) if dur is not None else None
        row["last_step"] = t.last_step
        row.update({f"p:{k}": (v if isinstance(v, int | float) and not isinstance(v, bool) else str(v))
                    for k, v in t.params.items()})
        row["run"] = run_id_for(attr, runs_dir, known_ids)
        row["run_dir"] = attr
        rows.append(row)
    df = pd.DataFrame(rows)
    if "value" in df and df["value"].isna().all() and any(c.startswith("value_") for c in df):
        df = df.drop(columns="value")
    for c in df.columns:
        if c.startswith("p:") and df[c].map(lambda v: isinstance(v, str)).any():
            df[c] = df[c].astype("string")
    return df


def finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
