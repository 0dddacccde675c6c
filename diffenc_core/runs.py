"""The run directory: atomic writes, status, and reading runs back (docs/architecture.md).

Every front (CLI, DVC stages, Prefect flows, Optuna trials, the dashboard) reads and writes runs
only through this module, so the layout below is the one contract between them::

    runs/<name>/status.json  params.yaml  history.parquet  metrics.json
                recon.parquet  latents.parquet  plots/  checkpoints/{last,best}.pt
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import platform
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diffenc_core.errors import RunError, StorageError, writing

STATUS = "status.json"
PARAMS = "params.yaml"
HISTORY = "history.parquet"
METRICS = "metrics.json"
RECON = "recon.parquet"
LATENTS = "latents.parquet"
POSTERIOR = "posterior.parquet"  # encoder vs exact posterior samples; empty without a known decoder
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
LIVE = "live"  # the DVC stages' dvclive folder (``diffenc train --live runs/<name>/live``)
RUN_ENTRIES = frozenset({STATUS, PARAMS, HISTORY, METRICS, RECON, LATENTS, POSTERIOR, PLOTS, CHECKPOINTS, LIVE})
"""Everything a run directory may hold (besides atomic-write leftovers): what replacing a run removes."""
EVALUATION_ENTRIES = (METRICS, RECON, LATENTS, POSTERIOR, PLOTS)
"""What ``diffenc evaluate`` writes: it measures one checkpoint, so a run that trains further drops it."""
KEPT_ENTRIES = frozenset({".gitignore"})  # DVC's list of the outputs it tracks here: kept when a run is replaced

# ------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file is removed whatever happens, so ``path`` is either the old file or the new
    one; a read-only or full disk is a StorageError naming the file. The file gets the permissions
    any new file of the user gets (the umask), not a temporary file's private ones.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_sibling(path)
    try:
        with writing(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_sibling(path: Path) -> Path:
    """Create an empty ``.<name>.<random>.tmp`` beside ``path`` with mode 0666 less the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # whatever the locale: every reader expects UTF-8


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_parquet(path: str | Path, table: pa.Table | pd.DataFrame) -> None:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Library versions recorded with every run."""
    import numpy
    import torch

    from diffenc_core import __version__

    return {
        "diffenc": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
    }


# --------------------------------------------------------------------------------- run object
@dataclass
class Run:
    """A handle on one run directory; reading is tolerant, writing is atomic."""

    path: Path
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS

    # -- status
    def status(self) -> dict[str, Any]:
        return self._read_json(STATUS) or {}

    def set_status(self, state: str, **extra: Any) -> None:
        current = self.status()
        current.update(extra)
        current["state"] = state
        if state == "running":
            current.setdefault("started", now())
            current.pop("error", None)
            current.pop("finished", None)
        else:
            current["finished"] = now()
        current.setdefault("versions", versions())
        atomic_write_json(self.file(STATUS), current)

    # -- tables and metrics
    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.file(METRICS), metrics)

    def metrics(self) -> dict[str, Any]:
        return self._read_json(METRICS) or {}

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        atomic_write_parquet(self.file(name), df)

    def table(self, name: str) -> pd.DataFrame | None:
        p = self.file(name)
        if not p.exists():
            return None
        try:
            return pd.read_parquet(p)
        except Exception as err:  # a torn or foreign file: report, never crash a reader
            self.problems.append(f"{name}: unreadable ({err.__class__.__name__})")
            return None

    def history(self) -> pd.DataFrame | None:
        return self.table(HISTORY)

    def params(self) -> dict[str, Any]:
        import yaml

        p = self.file(PARAMS)
        if not p.exists():
            return {}
        try:
            tree = yaml.load(p.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except Exception as err:
            self.problems.append(f"{PARAMS}: unreadable ({err.__class__.__name__})")
            return {}
        if tree is None:
            return {}
        if not isinstance(tree, dict):
            self.problems.append(f"{PARAMS}: not a mapping ({type(tree).__name__})")
            return {}
        return tree

    def _read_json(self, name: str) -> dict[str, Any] | None:
        p = self.file(name)
        if not p.exists():
            return None
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            return obj
        except Exception as err:
            self.problems.append(f"{name}: unreadable ({err.__class__.__name__})")
            return None

    def summary(self) -> dict[str, Any]:
        """One flat row for a runs table: name, method, dataset, beta, state, final metrics."""
        params = self.params()
        status = self.status()
        row: dict[str, Any] = {
            "run": str(self.path),
            "name": self.name,
            "method": params.get("train", {}).get("method"),
            "dataset": params.get("data", {}).get("dataset"),
            "beta": params.get("train", {}).get("beta"),
            "latent_dim": params.get("model", {}).get("latent_dim"),
            "state": status.get("state", "unknown"),
            "started": status.get("started"),
            "finished": status.get("finished"),
            "error": status.get("error"),
        }
        row.update(self.metrics())
        if not self.file(PARAMS).exists():
            self.problems.append(f"{PARAMS}: missing")
        row["problems"] = "; ".join(self.problems) or None
        return row


def create(runs_dir: str | Path, name: str) -> Run:
    """Make (or reopen) ``runs_dir/name`` with its sub-folders."""
    path = Path(runs_dir) / name
    with writing(path, "check train.runs_dir"):
        (path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        (path / PLOTS).mkdir(parents=True, exist_ok=True)
    return Run(path)


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory ``path`` is or lies in, if any: a folder with status.json, or params.yaml
    beside checkpoints/ (a project's own params.yaml alone is not a run)."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if (folder / STATUS).is_file() or ((folder / PARAMS).is_file() and (folder / CHECKPOINTS).is_dir()):
            return folder
    return None


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds anything but empty folders (a run, or what is left of one)."""
    p = Path(path)
    if p.is_file() or p.is_symlink():
        return True
    return p.is_dir() and any((f.is_file() or f.is_symlink()) and f.name not in KEPT_ENTRIES for f in p.rglob("*"))


def foreign_entries(path: str | Path) -> list[str]:
    """Entries of ``path`` that no run writes (another program's files, nested runs, a study)."""
    p = Path(path)
    if not p.is_dir():
        return []
    return sorted(e.name for e in p.iterdir() if e.name not in RUN_ENTRIES | KEPT_ENTRIES
                  and not (e.name.startswith(".") and e.name.endswith(".tmp")))


def remove(path: str | Path) -> None:
    """Remove every file of the run at ``path`` (live/ included), leaving an empty folder.

    Refuses a folder that holds anything a run does not write, so a mistyped name can never
    delete another program's files, a tuning study or a folder of runs; and checks that every
    file can be removed before removing any, so a refusal leaves the old run whole.
    """
    p = Path(path)
    foreign = foreign_entries(p)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RunError(f"{p}: not replacing it, it holds files no run writes ({shown}); "
                       "move them or choose another train.run")
    entries = [e for e in p.iterdir() if e.name not in KEPT_ENTRIES] if p.is_dir() else []
    _remove_entries(p, entries, "the old run's files", f"nothing of {p} was removed")


def remove_evaluation(path: str | Path) -> list[str]:
    """Remove the files of the run's last evaluation (metrics.json, its tables and plots); returns their
    names. For a resumed run that trains further: they describe a checkpoint it will no longer have."""
    p = Path(path)
    entries = [p / name for name in EVALUATION_ENTRIES if (p / name).exists() or (p / name).is_symlink()]
    entries = [e for e in entries if e.is_symlink() or not e.is_dir() or any(e.iterdir())]  # not an empty plots/
    _remove_entries(p, entries, "the stale evaluation", f"{p} was not resumed")
    return [e.name for e in entries]


def _remove_entries(folder: Path, entries: list[Path], what: str, outcome: str) -> None:
    """Remove ``entries`` of ``folder`` (files, links, whole folders) once every one is known to be removable."""
    for entry in entries:
        blocked = removal_blocked(entry)
        if blocked is not None:
            raise StorageError(f"{blocked[0]}: cannot remove {what} ({blocked[1]}); {outcome}")
    with writing(folder, "check train.runs_dir"):
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, onerror=_raise_with_path)
            else:
                entry.unlink()


def removal_blocked(entry: str | Path) -> tuple[Path, str] | None:
    """Why ``entry`` (a folder: with everything in it) cannot be removed, naming the folder at fault; None
    when it can. Removing needs write and search permission on the folder that holds a file, a folder must
    be listable and not a mount point; links are removed, never followed."""
    entry = Path(entry)
    if not os.access(entry.parent, os.W_OK | os.X_OK):
        return entry.parent, _denied(entry.parent)
    if entry.is_symlink() or not entry.is_dir():
        return None
    unlistable: list[OSError] = []
    for top, _, _ in os.walk(entry, onerror=unlistable.append):
        folder = Path(top)
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            return folder, _denied(folder)
        if os.path.ismount(folder):
            return folder, "a mount point"
    if unlistable:
        err = unlistable[0]
        return Path(err.filename or entry), err.strerror or "cannot be listed"
    return None


def _denied(folder: Path) -> str:
    """Why a folder refuses changes: a read-only file system, else its permissions."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return os.strerror(errno.EROFS) if read_only else os.strerror(errno.EACCES)


def _raise_with_path(func: Any, path: str, exc_info: Any) -> None:
    """shutil.rmtree's error, naming the full path (its own error names only the entry)."""
    err = exc_info[1]
    if isinstance(err, OSError) and err.errno is not None:
        raise OSError(err.errno, err.strerror, path) from None
    raise err


def open_run(path: str | Path) -> Run:
    """An existing run; an unknown path is a RunError naming it."""
    p = Path(path)
    if not p.is_dir() or not ((p / STATUS).exists() or (p / PARAMS).exists()):
        raise RunError(f"{p}: not a run directory (expected {STATUS} or {PARAMS} inside)")
    return Run(p)


def find_runs(root: str | Path) -> list[Run]:
    """Every run directory below ``root`` (nested, e.g. tuning trials), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for p in root.rglob(STATUS)} | {p.parent for p in root.rglob(PARAMS)}
    found = {p for p in found if CHECKPOINTS not in p.parts}
    return [Run(p) for p in sorted(found)]


def runs_table(root: str | Path) -> pd.DataFrame:
    """All runs below ``root`` as one DataFrame (one row each, problems listed, never raising)."""
    rows = [r.summary() for r in find_runs(root)]
    return pd.DataFrame(rows)
