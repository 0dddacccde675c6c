"""One study in its storage: created or loaded for an objective, its trials counted, and the settings
it was started with (target, search space, objective, the full resolved configuration) stored as
study user attributes, so that ``diffenc tune resume`` and ``tune show --export`` need nothing else.

A study is one experiment: once it has trials, starting it again with other settings is refused,
naming the changed keys; only keys that do not change what a trial trains may differ
(:data:`diffenc_core.config.STUDY_FREE`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from diffenc_core import config as config_mod
from diffenc_core.config import Config
from diffenc_core.errors import ConfigError, DiffencError
from flows.tuning.space import OBJECTIVES, objective_space
from flows.tuning.storage import existing_storage, shown, storage_url

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# study user attributes (JSON values)
ATTR_OBJECTIVE = "objective"  # the objective's name
ATTR_METRICS = "metrics"  # the metric behind each of the study's values
ATTR_TARGET = "n_trials"  # the target number of finished trials, updated when extended
ATTR_SPACE = "space"  # the search space sampled: {dotted key: dimension}
ATTR_CONFIG = "config"  # the full resolved configuration the trials start from

MAX_SHOWN_CHANGES = 5  # changed keys named in one error line


def directions(objective: str) -> list[str]:
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
        storage=storage, study_name=name, directions=directions(objective),
        sampler=sampler, pruner=pruner, load_if_exists=True,
    )
    made_for = study.user_attrs.get(ATTR_OBJECTIVE)
    if made_for is None:
        if len(study.directions) != len(OBJECTIVES[objective]):
            raise ConfigError(f"study '{name}' in {shown(url)} has {len(study.directions)} objective(s), "
                              f"tune.objective '{objective}' has {len(OBJECTIVES[objective])}")
        study.set_user_attr(ATTR_OBJECTIVE, objective)
        study.set_user_attr(ATTR_METRICS, list(OBJECTIVES[objective]))
        with contextlib.suppress(Exception):
            study.set_metric_names(list(OBJECTIVES[objective]))
    elif made_for != objective:
        raise ConfigError(
            f"tune.objective: study '{name}' in {shown(url)} was created for objective '{made_for}', not "
            f"'{objective}' (use another --study name, or --set tune.objective={made_for})"
        )
    return study


def load_existing(cfg: Config, name: str, url: str) -> optuna.Study:
    """A study that must exist: a missing storage or study is one clear DiffencError."""
    store = existing_storage(cfg, name, url)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = optuna.get_all_study_names(store)
        raise DiffencError(f"no study '{name}' in {shown(url)} (it has: {', '.join(names) or 'none'})") from None


# ------------------------------------------------------------------------------ stored settings
@dataclass(frozen=True)
class Stored:
    """What a study stored about how it runs: its configuration and target."""

    config: Config
    n_trials: int


def stored(study: optuna.Study) -> Stored | None:
    """The settings the study was last started with; None for a study made before they were stored."""
    attrs = study.user_attrs
    if ATTR_CONFIG not in attrs:
        return None
    cfg = config_mod.from_stored(attrs[ATTR_CONFIG], source=f"study '{study.study_name}' (stored settings)")
    return Stored(cfg, int(attrs.get(ATTR_TARGET, cfg.tune.n_trials)))


def resume_command(study: optuna.Study, url: str) -> str | None:
    """The exact command that continues this study from its stored settings (None if it stores none).

    ``--storage`` is left out only for the built-in default, ``runs/tune/<study>.db``.
    """
    if ATTR_CONFIG not in study.user_attrs:
        return None
    name = study.study_name
    line = f"diffenc tune resume --study {name}"
    return line if url == storage_url(Config(), name) else f"{line} --storage {shown(url)}"


def record(study: optuna.Study, cfg: Config, n_trials: int) -> None:
    """Store the settings of this start (after ``check_same_settings`` let it run)."""
    study.set_user_attr(ATTR_CONFIG, cfg.to_dict())
    study.set_user_attr(ATTR_TARGET, int(n_trials))
    study.set_user_attr(ATTR_SPACE, {k: d.model_dump(mode="json") for k, d in objective_space(cfg).items()})


def check_same_settings(study: optuna.Study, cfg: Config, url: str) -> None:
    """Once a study has trials, refuse to run it with settings that change what a trial trains."""
    before = stored(study)
    if before is None or not study.get_trials(deepcopy=False):
        return
    changed = changes(before.config, cfg)
    if changed:
        name = study.study_name
        listed = "; ".join(changed[:MAX_SHOWN_CHANGES]) + (
            f"; and {len(changed) - MAX_SHOWN_CHANGES} more" if len(changed) > MAX_SHOWN_CHANGES else "")
        raise ConfigError(
            f"study '{name}' in {shown(url)} was started with other settings ({listed}): continue it as it was with "
            f"`{resume_command(study, url)}`, or start another --study"
        )


def changes(old: Config, new: Config) -> list[str]:
    """``key: old → new`` for every key (outside STUDY_FREE) whose value differs; each search-space
    dimension is one key, ``tune.space['em.step_size']``."""
    a, b = config_mod.flatten(old.to_dict()), config_mod.flatten(new.to_dict())
    return [f"{key}: {_show(a.get(key))} → {_show(b.get(key))}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and not config_mod.is_free(key, config_mod.STUDY_FREE)]


def _show(value: Any) -> str:
    return "(unset)" if value is None else str(value)


# --------------------------------------------------------------------------------------- counts
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
    """Trials by state; RUNNING trials in ``ignore_running`` (dead journal trials) are not counted."""
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
