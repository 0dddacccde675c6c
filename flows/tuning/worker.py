"""One worker: ask the study for trials and run them until it has its target of finished trials.

Workers on one machine share a file lock (``<runs_dir>/tune/<study>.lock``) from counting the
finished and running trials until the new trial is RUNNING, so together they never ask for more
trials than the target needs. A worker that finds the remaining trials all running waits (reaping
stale ones) instead of leaving, so a retried trial is always picked up. Across machines (no shared
lock) a trial asked for beyond the target is marked FAIL with the user attribute ``surplus``.
"""

from __future__ import annotations

import os
import time

import optuna
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState
from rich.markup import escape

from diffenc_core.config import Config
from diffenc_core.errors import DiffencError
from flows.tuning.objective import Objective
from flows.tuning.output import quiet_optuna, say
from flows.tuning.space import OBJECTIVES
from flows.tuning.storage import is_journal, make_storage, tune_dir
from flows.tuning.study import Counts, count, open_study

MAX_CONSECUTIVE_FAILURES = 5  # a worker gives up after this many erroring trials in a row
PRUNER_STARTUP = (2, 5)  # the median pruner waits for this many trials (at least, at most) ...
PRUNER_STARTUP_SHARE = 4  # ... and otherwise for one in this many of the target
WAIT_S = (0.5, 2.0)  # polling while the last trials run elsewhere: half a heartbeat, within these bounds


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (Optuna's default, single- and multi-objective)."""
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(cfg: Config, n_trials: int) -> optuna.pruners.BasePruner:
    """Median pruning of single-objective studies (unless ``tune.pruner: none``)."""
    if cfg.tune.pruner == "none" or len(OBJECTIVES[cfg.tune.objective]) > 1:
        return optuna.pruners.NopPruner()
    low, high = PRUNER_STARTUP
    return optuna.pruners.MedianPruner(n_startup_trials=min(high, max(low, n_trials // PRUNER_STARTUP_SHARE)))


def study_lock(cfg: Config, name: str) -> FileLock:
    """The lock this machine's workers of one study take to count and ask for a trial."""
    path = tune_dir(cfg) / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def describe(trial: FrozenTrial) -> str:
    """A finished trial in a few words: its values, where it was pruned, or why it failed."""
    if trial.state == TrialState.COMPLETE:
        vals = ", ".join(f"{v:.4g}" for v in trial.values)
        return f"complete ({vals})"
    if trial.state == TrialState.PRUNED:
        return f"pruned at step {trial.last_step}"
    return f"failed: {trial.user_attrs.get('error') or 'see the log'}"


@quiet_optuna()
def work(
    cfg: Config,
    name: str,
    url: str,
    n_trials: int,
    index: int = 0,
    ignore_running: frozenset[int] = frozenset(),
    parent: int | None = None,
) -> Counts:
    """Run trials until the study has ``n_trials`` finished ones; returns the final counts.

    ``parent``: the pid of the ``diffenc tune`` that started this worker process; once it is gone
    (killed), the worker stops before asking for another trial.
    """
    storage = make_storage(cfg, url)
    heartbeat = not is_journal(url)  # make_storage gives every RDBStorage a heartbeat
    study = open_study(cfg, name, storage, url, pruner=make_pruner(cfg, n_trials))
    lock = study_lock(cfg, name)
    objective = Objective(cfg, name, n_trials, lock, ignore_running, index)
    tag = f"[dim]worker {index}[/] " if parent is not None or index else ""
    failures = 0
    last_error = ""
    wait = max(WAIT_S[0], min(WAIT_S[1], cfg.tune.heartbeat_interval / 2))

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal failures, last_error
        if trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            failures += 1
            last_error = str(trial.user_attrs.get("error"))
        elif trial.state != TrialState.FAIL:
            failures = 0
        say(f"{tag}trial {trial.number} {escape(describe(trial))}")

    try:
        while True:
            if parent is not None and os.getppid() != parent:
                say(f"{tag}stopping: the `diffenc tune` that started it (pid {parent}) is gone", stderr=True)
                return count(study, ignore_running)
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
                    time.sleep(wait)  # the running trials may still fail and be retried
                    continue
                # seeded by the number of trials so far (exact under the lock): reproducible for one
                # worker, and no two workers or resumed runs replay the same random proposals
                study.sampler = make_sampler(cfg, cfg.tune.sampler_seed + len(study.get_trials(deepcopy=False)))
                study.optimize(objective, n_trials=1, callbacks=[report], gc_after_trial=False)
            finally:
                lock.release()
    finally:
        lock.release(force=True)
