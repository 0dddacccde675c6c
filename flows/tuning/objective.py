"""One trial: train a budgeted run with the suggested parameters into the study's folder, report
its validation metric to the pruner, and return the final value(s)."""

from __future__ import annotations

import contextlib
import math
import os

import optuna
from filelock import BaseFileLock
from optuna.trial import TrialState

from diffenc_core import config as config_mod
from diffenc_core import trainer
from diffenc_core.config import Config
from diffenc_core.errors import ConfigError, DiffencError
from flows import entry
from flows.tuning.space import OBJECTIVES, objective_space, suggest
from flows.tuning.storage import study_dir
from flows.tuning.study import FINISHED

# user attributes the retry callback copies from a failed trial; a retry must not show them as its own
STALE_ATTRS = ("error", *OBJECTIVES["rate_distortion"], "val_neg_elbo", "val_mse", "steps")


class Objective:
    """Trains one budgeted run per trial and returns its final validation metric(s)."""

    def __init__(
        self, cfg: Config, name: str, n_trials: int, lock: BaseFileLock,
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
        run_dir = study_dir(self.cfg, self.name) / str(trial.number)
        trial.set_user_attr("run_path", str(run_dir))
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("pid", os.getpid())  # which process to look at (or stop) for this trial
        retried = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retried is not None:  # set by RetryHeartbeatStaleTrialCallback on the re-queued trial
            trial.set_user_attr("retry_of", int(retried))
        for stale_key in STALE_ATTRS:
            if stale_key in trial.user_attrs:
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
            # a new run: every trial (a retry too) has a fresh number, so its folder is new; one left
            # by a deleted study of the same name is refused, never overwritten (the trial fails)
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
