"""Where a study lives: the storage URL (SQLite by default, any SQLAlchemy URL, or a journal file),
the study's folder for trial runs, and the Optuna storage object with its heartbeat."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from diffenc_core import runs
from diffenc_core.config import Config
from diffenc_core.errors import DiffencError
from flows.tuning.output import say

SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_PREFIX = "sqlite:///"
SQLITE_TIMEOUT_S = 60  # seconds a SQLite writer waits for another worker's transaction
POSTGRES_EXTRA = "pip install 'diffenc[postgres]'"
# SQLAlchemy's driver for postgresql://: psycopg (3) from SQLAlchemy 2.1 on, psycopg2 before; the extra has both
POSTGRES_DRIVERS = ("psycopg", "psycopg2")


def tune_dir(cfg: Config) -> Path:
    """``<train.runs_dir>/tune``: the default storages and every study's folder."""
    return Path(cfg.train.runs_dir) / "tune"


def study_dir(cfg: Config, name: str) -> Path:
    """``<train.runs_dir>/tune/<study>``: the trials' run directories and the worker pool's files."""
    return tune_dir(cfg) / name


def storage_url(cfg: Config, study: str, storage: str | None = None) -> str:
    """The storage to use: ``--storage``, else ``tune.storage``, else ``sqlite:///<runs>/tune/<study>.db``.

    A plain ``*.db``/``*.sqlite`` path becomes a SQLite URL; any other plain path is a journal file.
    """
    spec = storage if storage is not None else cfg.tune.storage
    if not spec:
        return f"{SQLITE_PREFIX}{tune_dir(cfg) / f'{study}.db'}"
    if "://" in spec:
        return spec
    if Path(spec).suffix.lower() in SQLITE_SUFFIXES:
        return f"{SQLITE_PREFIX}{spec}"
    return spec


def is_journal(url: str) -> bool:
    """A plain path (no scheme) is an Optuna journal file."""
    return "://" not in url


def local_file(url: str) -> Path | None:
    """The file behind a SQLite URL or a journal path; None for a server (or in-memory) storage."""
    if is_journal(url):
        return Path(url)
    if url.startswith(SQLITE_PREFIX) and ":memory:" not in url:
        return Path(url[len(SQLITE_PREFIX):].split("?", 1)[0])
    return None


def shown(url: str) -> str:
    """``url`` as messages print it: a database password masked (``postgresql://user:***@host/db``)."""
    if is_journal(url):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: it holds no password it could mask
        return url


def without_password(url: str) -> tuple[str, str | None]:
    """A PostgreSQL ``url`` without its password, and the password (for ``PGPASSWORD``, which libpq
    reads): worker processes get it through their environment, not on a command line that ``ps``
    shows to every user. Other URLs come back unchanged, with None."""
    if not url.lower().startswith("postgresql"):
        return url, None
    try:
        from sqlalchemy.engine import URL, make_url

        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy can parse: opening it will say so
        return url, None
    if parsed.password is None:
        return url, None
    bare = URL.create(parsed.drivername, parsed.username, None, parsed.host, parsed.port, parsed.database,
                      parsed.query)
    return bare.render_as_string(hide_password=False), str(parsed.password)


def _missing_module(err: BaseException | None) -> str | None:
    """The top-level module whose import failed somewhere in ``err``'s chain (Optuna re-raises
    SQLAlchemy's ImportError as its own)."""
    while err is not None:
        if isinstance(err, ModuleNotFoundError) and err.name:
            return err.name.split(".")[0]
        err = err.__cause__ or err.__context__
    return None


def why_not(url: str, err: Exception) -> str:
    """One line saying why the storage at ``url`` could not be opened, and what to do."""
    scheme = url.split("://", 1)[0].lower()
    dialect, _, driver = scheme.partition("+")
    if isinstance(err, ImportError):
        module = _missing_module(err)
        if dialect == "postgresql" and driver in ("", *POSTGRES_DRIVERS) and module in (None, *POSTGRES_DRIVERS):
            return f"the PostgreSQL driver {module or driver or 'psycopg'} is not installed: {POSTGRES_EXTRA}"
        return (f"the database driver {module or driver or 'SQLAlchemy uses for ' + dialect} is not installed "
                "(pip install it in this environment)")
    if scheme == "postgres":
        return "SQLAlchemy does not know the scheme postgres://: write postgresql://"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"cannot open it ({err.__class__.__name__}: {first})"


class StaleTrial:
    """Heartbeat-stale trial callback: re-queue its parameters and mark its run directory failed."""

    def __init__(self, max_retry: int):
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.retry(study, trial)
        path = trial.user_attrs.get("run_path")
        if path and Path(path).is_dir():
            with contextlib.suppress(Exception):
                runs.Run(Path(path)).set_status(
                    "failed", error=f"trial {trial.number}: its worker stopped (no heartbeat); parameters re-queued"
                )
        say(f"[yellow]trial {trial.number}: worker lost (no heartbeat) -> FAIL, parameters re-queued[/]")


def make_storage(cfg: Config, url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """An RDBStorage (with heartbeat and retry of stale trials) or a JournalStorage for a file path."""
    try:
        if is_journal(url):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        kwargs: dict[str, Any] = {}
        path = local_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        if heartbeat:
            kwargs.update(
                heartbeat_interval=cfg.tune.heartbeat_interval,
                grace_period=cfg.tune.grace_period,
                heartbeat_stale_trial_callback=StaleTrial(cfg.tune.max_retry),
            )
        return optuna.storages.RDBStorage(url, **kwargs)
    except DiffencError:
        raise
    except Exception as err:  # bad URL, missing driver, unreachable server
        raise DiffencError(f"--storage {shown(url)}: {why_not(url, err)}") from None


def existing_storage(cfg: Config, name: str, url: str) -> optuna.storages.BaseStorage:
    """Open a storage that must already exist: a missing local file is an error, never created."""
    local = local_file(url)
    if local is not None and not local.is_file():
        raise DiffencError(f"{local}: no tuning storage here yet (run `diffenc tune --study {name}` first)")
    return make_storage(cfg, url, heartbeat=False)
