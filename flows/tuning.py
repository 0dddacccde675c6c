"""Optuna tuning: one resumable study per name, several local worker processes, pruning, Pareto fronts.

``run_study`` runs (or resumes) a study until it has ``n_trials`` *finished* trials (COMPLETE or
PRUNED); ``show_study`` prints the best trial(s) / the Pareto front and exports a params file.
All Optuna code of the project lives here (``diffenc_core`` never imports optuna).

Storage
    By default one SQLite file per study, ``<train.runs_dir>/tune/<study>.db``, opened as an
    ``RDBStorage`` with a heartbeat: a worker that dies mid-trial stops beating, and once
    ``tune.grace_period`` seconds have passed the next worker that counts or asks for a trial marks
    it FAIL and re-queues its parameters (``RetryHeartbeatStaleTrialCallback``, at most
    ``tune.max_retry`` times). Any SQLAlchemy URL works the same (``postgresql://...`` for many
    machines). A plain file path that is not ``*.db``/``*.sqlite`` is a ``JournalStorage`` file
    (faster, but Optuna has no heartbeat there: a killed worker's trial stays RUNNING).

Counting
    Each worker holds a file lock (``<runs_dir>/tune/<study>.lock``) from counting the finished and
    running trials until its new trial is RUNNING, so local workers never ask for more trials than
    the target needs: the study ends with exactly ``n_trials`` finished trials. A worker that finds
    the remaining trials all running waits (reaping stale ones) instead of leaving, so a retried
    trial is always picked up. Across machines (no shared lock) a trial asked for beyond the target
    is marked FAIL with the user attribute ``surplus`` before it trains.

Each trial trains ``tune.trial_steps`` steps into ``<train.runs_dir>/tune/<study>/<trial number>``
(user attribute ``run_path``), reporting the objective every ``tune.report_every`` steps to the
pruner (single objective only).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from diffenc_core import config as config_mod
from diffenc_core import data, runs, trainer
from diffenc_core.config import Config, SearchDim
from diffenc_core.errors import ConfigError, DiffencError
from flows import entry

console = Console()

# objective -> the validation metrics it minimises (the order of the study's values)
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "neg_elbo": ("val_neg_elbo",),
    "distortion": ("val_distortion",),
    "rate_distortion": ("val_rate", "val_distortion"),
}
# config keys each trial sets itself; a search space may not touch them
MANAGED_KEYS = ("train.run", "train.runs_dir", "train.steps", "train.val_every")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_CONSECUTIVE_FAILURES = 5  # a worker gives up after this many erroring trials in a row
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


# ------------------------------------------------------------------------------- configuration
def study_name(cfg: Config, study: str | None) -> str:
    name = study if study is not None else cfg.tune.study
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"--study {name!r}: use letters, digits, '.', '_' or '-' (it names files)")
    return name


def tune_dir(cfg: Config) -> Path:
    return Path(cfg.train.runs_dir) / "tune"


def storage_url(cfg: Config, study: str, storage: str | None = None) -> str:
    """The storage to use: ``--storage``, else ``tune.storage``, else ``sqlite:///<runs>/tune/<study>.db``.

    A plain ``*.db``/``*.sqlite`` path becomes a SQLite URL; any other plain path is a journal file.
    """
    spec = storage if storage is not None else cfg.tune.storage
    if not spec:
        return f"sqlite:///{tune_dir(cfg) / f'{study}.db'}"
    if "://" in spec:
        return spec
    if Path(spec).suffix.lower() in SQLITE_SUFFIXES:
        return f"sqlite:///{spec}"
    return spec


def is_journal(url: str) -> bool:
    return "://" not in url


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///") :].split("?", 1)[0])
    return None


def objective_space(cfg: Config) -> dict[str, SearchDim]:
    """The search space actually sampled: 'distortion' is measured at the configured, fixed β."""
    space = dict(cfg.tune.space)
    if cfg.tune.objective == "distortion":
        space.pop("train.beta", None)
    return space


def check_space(cfg: Config) -> None:
    """Reject search-space entries no trial could use, naming the key (ConfigError)."""
    if cfg.tune.grace_period <= cfg.tune.heartbeat_interval:
        raise ConfigError(
            f"tune.grace_period ({cfg.tune.grace_period}) must exceed tune.heartbeat_interval "
            f"({cfg.tune.heartbeat_interval}), or live trials would be failed as stale"
        )
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: declare at least one dimension to tune")
    if not objective_space(cfg):
        raise ConfigError("tune.space: only train.beta is declared, and objective 'distortion' fixes β")
    for key, dim in cfg.tune.space.items():
        where = f"tune.space['{key}']"
        if key in MANAGED_KEYS or key.startswith(("tune.", "data.")):
            raise ConfigError(
                f"{where}: cannot be tuned (each trial sets {', '.join(MANAGED_KEYS)} itself; "
                "data.* and tune.* are fixed for a study)"
            )
        if dim.type == "int":
            if not (float(dim.low).is_integer() and float(dim.high).is_integer()):
                raise ConfigError(f"{where}: an int dimension needs whole-number low/high (got {dim.low}, {dim.high})")
            probes = [int(dim.low), int(dim.high)]
        elif dim.type == "float":
            probes = [float(dim.low), float(dim.high)]
        else:
            if dim.log:
                raise ConfigError(f"{where}: 'log' applies to float/int dimensions, not categorical")
            if len({repr(c) for c in dim.choices}) != len(dim.choices):
                raise ConfigError(f"{where}: 'choices' has duplicates")
            bad = [c for c in dim.choices if not isinstance(c, bool | int | float | str) and c is not None]
            if bad:
                raise ConfigError(f"{where}: choices must be plain scalars (got {bad[0]!r})")
            probes = list(dim.choices)
        for value in probes:
            try:
                config_mod.with_overrides(cfg, {key: value})
            except ConfigError as err:
                detail = str(err).replace("config: ", "")
                raise ConfigError(
                    f"{where}: value {value!r} of this {dim.type} dimension is not valid here: {detail}"
                ) from None


def suggest(trial: optuna.Trial, space: dict[str, SearchDim]) -> dict[str, Any]:
    """One value per dimension; the parameter names are the dotted config keys."""
    params: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "float":
            params[key] = trial.suggest_float(key, float(dim.low), float(dim.high), log=dim.log)
        elif dim.type == "int":
            params[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[key] = trial.suggest_categorical(key, list(dim.choices))
    return params


def ensure_data(cfg: Config) -> None:
    """Prepare the dataset once, before any worker starts (workers only read it); again when
    ``data`` settings changed since it was prepared."""
    if not data.is_prepared(cfg.data):
        console.print(f"preparing {cfg.data.name} into {cfg.data.prepared_dir}")
        entry.prepare_entry(cfg)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Our own one line per trial instead of Optuna's INFO/WARNING log, and no ExperimentalWarning
    for the heartbeat API we rely on on purpose (both restored afterwards)."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


# ------------------------------------------------------------------------------------- storage
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
        console.print(f"[yellow]trial {trial.number}: worker lost (no heartbeat) -> FAIL, parameters re-queued[/]")


def make_storage(cfg: Config, url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """An RDBStorage (with heartbeat and retry of stale trials) or a JournalStorage for a file path."""
    try:
        if is_journal(url):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        kwargs: dict[str, Any] = {}
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
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
        raise DiffencError(f"--storage {url}: cannot open it ({err.__class__.__name__}: {err})") from None


def _directions(objective: str) -> list[str]:
    return ["minimize"] * len(OBJECTIVES[objective])


def open_study(
    cfg: Config,
    name: str,
    storage: optuna.storages.BaseStorage,
    url: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study, or load it and check it was made for the same objective."""
    objective = cfg.tune.objective
    study = optuna.create_study(
        storage=storage, study_name=name, directions=_directions(objective),
        sampler=sampler, pruner=pruner, load_if_exists=True,
    )
    made_for = study.user_attrs.get("objective")
    if made_for is None:
        if len(study.directions) != len(OBJECTIVES[objective]):
            raise ConfigError(f"study '{name}' in {url} has {len(study.directions)} objective(s), "
                              f"tune.objective '{objective}' has {len(OBJECTIVES[objective])}")
        study.set_user_attr("objective", objective)
        study.set_user_attr("metrics", list(OBJECTIVES[objective]))
        with contextlib.suppress(Exception):
            study.set_metric_names(list(OBJECTIVES[objective]))
    elif made_for != objective:
        raise ConfigError(
            f"tune.objective: study '{name}' in {url} was created for objective '{made_for}', not "
            f"'{objective}' (use another --study name, or --set tune.objective={made_for})"
        )
    return study


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    running_numbers: list[int] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def count(study: optuna.Study, ignore_running: frozenset[int] = frozenset()) -> Counts:
    c = Counts()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.FAIL:
            c.failed += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
        elif t.state == TrialState.RUNNING and t.number not in ignore_running:
            c.running += 1
            c.running_numbers.append(t.number)
    return c


class AskLock:
    """An exclusive file lock between this machine's workers (no-op where fcntl is missing)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")  # noqa: SIM115 - held for the worker's lifetime
        self.held = False

    def acquire(self) -> None:
        if not self.held:
            with contextlib.suppress(ImportError):
                import fcntl

                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
            self.held = True

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(ImportError):
                import fcntl

                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        self.release()
        self.file.close()


# ----------------------------------------------------------------------------------- objective
class Objective:
    """Trains one budgeted run per trial and returns its final validation metric(s)."""

    def __init__(
        self, cfg: Config, name: str, n_trials: int, lock: AskLock,
        ignore_running: frozenset[int] = frozenset(), worker: int = 0,
    ):
        self.cfg = cfg
        self.worker = worker
        self.name = name
        self.n_trials = n_trials
        self.lock = lock
        self.ignore_running = ignore_running
        self.metrics = OBJECTIVES[cfg.tune.objective]
        self.report = len(self.metrics) == 1  # Optuna reports/prunes single-objective trials only
        self.space = objective_space(cfg)

    def failed_value(self) -> float | list[float]:
        """NaN: Optuna marks the trial FAIL without a traceback in the log."""
        return math.nan if len(self.metrics) == 1 else [math.nan] * len(self.metrics)

    def surplus(self, trial: optuna.Trial) -> bool:
        """Whether trials numbered before this one already fill the target (only across machines)."""
        before = [
            t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            if t.number < trial.number and t.number not in self.ignore_running
        ]
        return len(before) >= self.n_trials

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.lock.release()  # this trial is RUNNING now: other workers may count and ask
        if self.surplus(trial):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("error", "surplus: the study already had its target number of trials")
            return self.failed_value()
        params = suggest(trial, self.space)
        run_dir = tune_dir(self.cfg) / self.name / str(trial.number)
        trial.set_user_attr("run_path", str(run_dir))
        trial.set_user_attr("worker", self.worker)
        retried = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retried is not None:  # set by RetryHeartbeatStaleTrialCallback on the re-queued trial
            trial.set_user_attr("retry_of", int(retried))
        for stale_key in ("error", *OBJECTIVES["rate_distortion"], "val_neg_elbo", "val_mse", "steps"):
            if stale_key in trial.user_attrs:  # copied from the failed trial by the retry callback
                trial.set_user_attr(stale_key, None)
        try:
            trial_cfg = config_mod.with_overrides(self.cfg, {
                **params,
                "train.runs_dir": str(run_dir.parent),
                "train.run": run_dir.name,
                "train.steps": self.cfg.tune.trial_steps,
                "train.val_every": min(self.cfg.tune.report_every, self.cfg.tune.trial_steps),
            })
        except ConfigError as err:  # e.g. two dimensions that conflict (step_size > step_size_max)
            trial.set_user_attr("error", str(err))
            return self.failed_value()
        last: dict[str, float] = {}

        def on_validate(step: int, val: dict[str, float]) -> None:
            last.update(val, step=step)
            if self.report:  # intermediate values: for the pruner and the dashboard's curves
                trial.report(val[self.metrics[0]], step)
                # never with tune.pruner 'none' (NopPruner), nor at the last step: a finished run completes
                if step < self.cfg.tune.trial_steps and trial.should_prune():
                    raise trainer.StopTraining(f"pruned at step {step}")

        try:
            entry.train_entry(trial_cfg, progress=False, on_validate=on_validate)
        except trainer.StopTraining as stop:
            self.record(trial, last)
            raise optuna.TrialPruned(str(stop)) from None
        except KeyboardInterrupt:  # Ctrl-C: this trial becomes FAIL; re-queue its parameters for the resume
            with contextlib.suppress(Exception):
                trial.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
            raise
        except DiffencError as err:  # divergence, bad data: the trial fails, the study goes on
            self.record(trial, last)
            trial.set_user_attr("error", f"{err.__class__.__name__}: {err}")
            return self.failed_value()
        self.record(trial, last)
        values = [float(last[m]) for m in self.metrics]
        return values[0] if len(values) == 1 else values

    @staticmethod
    def record(trial: optuna.Trial, last: dict[str, float]) -> None:
        for key, value in last.items():
            trial.set_user_attr(key if key != "step" else "steps", float(value) if key != "step" else int(value))


# -------------------------------------------------------------------------------------- worker
def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (Optuna 5's default, single- and multi-objective; constant liar for parallel workers)."""
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: Config, n_trials: int) -> optuna.pruners.BasePruner:
    if cfg.tune.pruner == "none" or len(OBJECTIVES[cfg.tune.objective]) > 1:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, n_trials // 4)))


def describe(trial: FrozenTrial) -> str:
    if trial.state == TrialState.COMPLETE:
        vals = ", ".join(f"{v:.4g}" for v in trial.values)
        return f"complete ({vals})"
    if trial.state == TrialState.PRUNED:
        return f"pruned at step {trial.last_step}"
    return f"failed: {trial.user_attrs.get('error') or 'see the log'}"


@_quiet_optuna()
def work(
    cfg: Config,
    name: str,
    url: str,
    n_trials: int,
    index: int = 0,
    ignore_running: frozenset[int] = frozenset(),
) -> Counts:
    """One worker: run trials until the study has ``n_trials`` finished ones; returns the final counts."""
    storage = make_storage(cfg, url)
    heartbeat = not is_journal(url)  # make_storage gives every RDBStorage a heartbeat
    study = open_study(cfg, name, storage, url, pruner=make_pruner(cfg, n_trials))
    lock = AskLock(tune_dir(cfg) / f"{name}.lock")
    objective = Objective(cfg, name, n_trials, lock, ignore_running, index)
    tag = f"[dim]worker {index}[/] " if index or cfg.tune.workers > 1 else ""
    failures = 0
    last_error = ""
    poll = max(0.5, min(2.0, cfg.tune.heartbeat_interval / 2))

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal failures, last_error
        if trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            failures += 1
            last_error = str(trial.user_attrs.get("error"))
        elif trial.state != TrialState.FAIL:
            failures = 0
        console.print(f"{tag}trial {trial.number} {describe(trial)}", highlight=False)

    try:
        while True:
            lock.acquire()
            try:
                optuna.storages.fail_stale_trials(study)
                c = count(study, ignore_running)
                if c.finished >= n_trials:
                    return c
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise DiffencError(
                        f"study '{name}': {failures} trials in a row failed; the last: {last_error}"
                    )
                if c.finished + c.running >= n_trials:
                    if not heartbeat:  # a journal file cannot tell a dead worker from a live one
                        return c
                    lock.release()
                    time.sleep(poll)  # the running trials may still fail and be retried
                    continue
                # seeded by the number of trials so far (exact under the lock): reproducible for one
                # worker, and no two workers or resumed runs replay the same random proposals
                study.sampler = make_sampler(cfg, cfg.tune.sampler_seed + len(study.get_trials(deepcopy=False)))
                study.optimize(objective, n_trials=1, callbacks=[report], gc_after_trial=False)
            finally:
                lock.release()
    finally:
        lock.close()


# ---------------------------------------------------------------------------------- run_study
@_quiet_optuna()
def run_study(
    cfg: Config,
    study: str | None = None,
    storage: str | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run or resume the study until it has ``n_trials`` finished trials; returns its summary."""
    name = study_name(cfg, study)
    n = n_trials if n_trials is not None else cfg.tune.n_trials
    w = workers if workers is not None else cfg.tune.workers
    if n < 1:
        raise ConfigError(f"--n-trials {n}: must be at least 1")
    if w < 1:
        raise ConfigError(f"--workers {w}: must be at least 1")
    check_space(cfg)
    cfg = config_mod.with_overrides(cfg, {"tune.study": name, "tune.n_trials": n, "tune.workers": w})
    url = storage_url(cfg, name, storage)
    ensure_data(cfg)
    handle = open_study(cfg, name, make_storage(cfg, url, heartbeat=False), url)
    before = count(handle)
    ignore: frozenset[int] = frozenset()
    if is_journal(url) and before.running:
        ignore = frozenset(before.running_numbers)
        console.print(f"[yellow]trials {sorted(ignore)} are RUNNING in a journal file, which has no heartbeat: "
                      "if their worker died they stay RUNNING; they are not counted toward the target[/]")
    console.print(
        f"study [bold]{name}[/] ({cfg.tune.objective}) in {url}: {before.finished}/{n} finished"
        + (f", {w} workers" if w > 1 else ""), highlight=False,
    )
    if before.finished < n:
        if w == 1:
            work(cfg, name, url, n, 0, ignore)
        else:
            _spawn_workers(cfg, name, url, n, w, ignore)
    result = summarize(handle, url)
    print_study(handle, result)
    if result["counts"]["finished"] < n:
        raise DiffencError(
            f"study '{name}' has {result['counts']['finished']}/{n} finished trials "
            f"({result['counts']['running']} still RUNNING); re-run the same command to resume"
        )
    return result


def _spawn_workers(cfg: Config, name: str, url: str, n: int, w: int, ignore: frozenset[int]) -> None:
    """``w`` processes of ``python -m flows.tuning worker`` on the same study; waits for all."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="diffenc-tune-") as tmp:
        cfg_file = Path(tmp) / "params.yaml"
        config_mod.dump(cfg, cfg_file)
        cmd = [sys.executable, "-m", "flows.tuning", "worker", "--config", str(cfg_file), "--study", name,
               "--storage", url, "--n-trials", str(n)]
        if ignore:
            cmd += ["--ignore-running", ",".join(map(str, sorted(ignore)))]
        procs = [subprocess.Popen([*cmd, "--index", str(i)], env=env) for i in range(w)]
        try:
            codes = [p.wait() for p in procs]
        except BaseException:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            raise
    bad = [(i, rc) for i, rc in enumerate(codes) if rc != 0]
    if bad:
        console.print("[yellow]" + "; ".join(f"worker {i} exited with status {rc}" for i, rc in bad) + "[/]")


# ------------------------------------------------------------------------------ show / export
def _trial_row(t: FrozenTrial) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "values": list(t.values) if t.values else None,
        "params": dict(t.params),
        "run_path": t.user_attrs.get("run_path"),
        "retry_of": t.user_attrs.get("retry_of"),
    }


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Single objective: completed trials, best first. Multi-objective: the Pareto front by first value."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: tuple(t.values))
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    return sorted(done, key=lambda t: sign * t.value)


def summarize(study: optuna.Study, url: str) -> dict[str, Any]:
    c = count(study)
    best = best_trials(study)
    multi = len(study.directions) > 1
    return {
        "study": study.study_name,
        "storage": url,
        "objective": study.user_attrs.get("objective"),
        "metrics": study.user_attrs.get("metrics"),
        "counts": {"complete": c.complete, "pruned": c.pruned, "failed": c.failed, "running": c.running,
                   "waiting": c.waiting, "finished": c.finished},
        "pareto_front" if multi else "best": [_trial_row(t) for t in (best if multi else best[:1])],
    }


def _short_names(keys: list[str]) -> dict[str, str]:
    """``em.step_size`` -> ``step_size`` where the last part is unambiguous (narrow table columns)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def print_study(study: optuna.Study, summary: dict[str, Any], top: int = 10) -> None:
    """Counts, the best trial's parameters (single objective), and the top trials / the Pareto front."""
    c = summary["counts"]
    console.print(
        f"study [bold]{summary['study']}[/] ({summary.get('objective')}) in {summary['storage']}: "
        f"{c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "") + (f", {c['waiting']} waiting" if c["waiting"] else ""),
        highlight=False,
    )
    multi = len(study.directions) > 1
    shown = best_trials(study)
    if not shown:
        console.print("no completed trials yet")
        return
    metrics = summary.get("metrics") or [f"value {i}" for i in range(len(study.directions))]
    if not multi:
        print_trial(shown[0], metrics, title=f"best trial: {shown[0].number}")
        shown = shown[:top]
    keys = sorted({k for t in shown for k in t.params})
    short = _short_names(keys)
    title = f"Pareto front ({len(shown)} trials, by {metrics[0]})" if multi else f"top {len(shown)} trials"
    table = Table(title=title)
    table.add_column("trial", justify="right")
    for m in metrics:
        table.add_column(m, justify="right", style="bold")
    for k in keys:
        table.add_column(short[k], justify="right")
    for t in shown:
        table.add_row(str(t.number), *(f"{v:.4g}" for v in t.values), *(_fmt(t.params.get(k)) for k in keys))
    console.print(table)


def print_trial(trial: FrozenTrial, metrics: list[str], title: str) -> None:
    """One trial as a key/value table: its values, parameters (full keys) and run directory."""
    table = Table(title=title, show_header=False)
    table.add_column("key")
    table.add_column("value")
    for m, v in zip(metrics, trial.values or [], strict=False):
        table.add_row(f"[bold]{m}[/]", f"{v:.6g}")
    for k, v in sorted(trial.params.items()):
        table.add_row(k, repr(v) if isinstance(v, float) else str(v))
    table.add_row("run", str(trial.user_attrs.get("run_path", "")))
    console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def choose_export(study: optuna.Study, number: int | None) -> FrozenTrial:
    """``--trial N`` if given; else the best trial, or on a Pareto front the lowest rate + distortion."""
    if number is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number == number:
                if t.state != TrialState.COMPLETE:
                    raise DiffencError(f"--trial {number}: trial is {t.state.name}, not COMPLETE")
                return t
        raise DiffencError(f"--trial {number}: no such trial in study '{study.study_name}'")
    best = best_trials(study)
    if not best:
        raise DiffencError(f"study '{study.study_name}': no completed trial to export yet")
    if len(study.directions) > 1:
        return min(best, key=lambda t: sum(t.values))  # the β = 1 ELBO point of the front
    return best[0]


def export_params(cfg: Config, trial: FrozenTrial, path: str | Path) -> Path:
    """The full resolved configuration with the trial's parameters applied (a params.yaml)."""
    tuned = config_mod.with_overrides(cfg, dict(trial.params))
    path = Path(path)
    config_mod.dump(tuned, path)
    return path


@_quiet_optuna()
def show_study(
    cfg: Config,
    study: str | None = None,
    storage: str | None = None,
    export: str | Path | None = None,
    trial: int | None = None,
) -> dict[str, Any]:
    """Print the best trial(s) / Pareto front; with ``export``, write the chosen trial's params file."""
    name = study_name(cfg, study)
    url = storage_url(cfg, name, storage)
    local = Path(url) if is_journal(url) else _sqlite_path(url)
    if local is not None and not local.is_file():
        raise DiffencError(f"{local}: no tuning storage here yet (run `diffenc tune --study {name}` first)")
    store = make_storage(cfg, url, heartbeat=False)
    try:
        handle = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        raise DiffencError(f"no study '{name}' in {url} (it has: {', '.join(names) or 'none'})") from None
    summary = summarize(handle, url)
    print_study(handle, summary)
    if export is not None:
        chosen = choose_export(handle, trial)
        out = export_params(cfg, chosen, export)
        if len(handle.directions) > 1 or trial is not None:
            print_trial(chosen, summary.get("metrics") or [], title=f"exported trial: {chosen.number}")
        sets = " ".join(f"-S {k}={v}" for k, v in chosen.params.items())
        console.print(
            f"wrote [bold]{out}[/] (trial {chosen.number}): `diffenc train --params {out}`, or "
            f"`cp {out} params.yaml && dvc exp run`, or `dvc exp run {sets}`",
            highlight=False, soft_wrap=True,
        )
        summary["export"] = {"path": str(out), "trial": chosen.number}
    return summary


# -------------------------------------------------------------------------------- worker entry
def main(argv: list[str] | None = None) -> int:
    """``python -m flows.tuning worker --config FILE --study NAME --storage URL --n-trials N --index I``."""
    parser = argparse.ArgumentParser(prog="python -m flows.tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="one tuning worker process (started by `diffenc tune --workers N`)")
    w.add_argument("--config", required=True)
    w.add_argument("--study", required=True)
    w.add_argument("--storage", required=True)
    w.add_argument("--n-trials", type=int, required=True)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--ignore-running", default="")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
        if cfg.train.threads > 0:
            import torch

            torch.set_num_threads(cfg.train.threads)
        ignore = frozenset(int(x) for x in args.ignore_running.split(",") if x)
        work(cfg, args.study, args.storage, args.n_trials, args.index, ignore)
    except DiffencError as err:
        Console(stderr=True).print(f"[bold red]error:[/] worker {args.index}: {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
