"""What a study searches: the objectives, the study name, the search space, its checks and the
values Optuna suggests for one trial."""

from __future__ import annotations

import re
from typing import Any

import optuna

from diffenc_core import config as config_mod
from diffenc_core.config import Config, SearchDim
from diffenc_core.errors import ConfigError

# objective -> the validation metrics it minimises (the order of the study's values)
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "neg_elbo": ("val_neg_elbo",),
    "distortion": ("val_distortion",),
    "rate_distortion": ("val_rate", "val_distortion"),
}
MANAGED_KEYS = config_mod.TRIAL_KEYS  # config keys each trial sets itself; a search space may not touch them
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def study_name(cfg: Config, study: str | None) -> str:
    """``--study`` or ``tune.study``; it names files, so letters, digits, '.', '_' and '-' only."""
    name = study if study is not None else cfg.tune.study
    if not name or not STUDY_NAME.fullmatch(name):
        raise ConfigError(f"--study {name!r}: use letters, digits, '.', '_' or '-' (it names files)")
    return name


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
                detail = str(err).removeprefix(f"--set {key}: ")
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
