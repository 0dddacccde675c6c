"""Running a study: ``run_study`` (the ``diffenc tune`` command) runs or extends it until it has
its target of finished trials, in this process or a local worker pool; ``resume_study`` (``diffenc
tune resume``) does the same from what the study stored, given only its name."""

from __future__ import annotations

from typing import Any

from diffenc_core import config as config_mod
from diffenc_core import data
from diffenc_core.config import Config
from diffenc_core.errors import ConfigError, DiffencError
from flows import entry
from flows.tuning import pool
from flows.tuning import study as study_mod
from flows.tuning.output import quiet_optuna, say
from flows.tuning.report import print_study, summarize
from flows.tuning.space import check_space, study_name
from flows.tuning.storage import is_journal, local_file, make_storage, shown, storage_url, study_dir
from flows.tuning.worker import work


def ensure_data(cfg: Config) -> None:
    """Prepare the dataset once, before any worker starts (workers only read it); again when
    ``data`` settings changed since it was prepared."""
    if not data.is_prepared(cfg.data):
        say(f"preparing {cfg.data.name} into {cfg.data.prepared_dir}")
        entry.prepare_entry(cfg)


def check_target(n_trials: int) -> None:
    if n_trials < 1:
        raise ConfigError(f"--n-trials {n_trials}: must be at least 1")


@quiet_optuna()
def run_study(
    cfg: Config,
    study: str | None = None,
    storage: str | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run or resume the study until it has ``n_trials`` finished trials; returns its summary.

    Raises ConfigError for settings a study with trials was not started with, and WorkerDied when a
    worker process of the pool died (after the study ran to its end with the others).
    """
    name = study_name(cfg, study)
    n = n_trials if n_trials is not None else cfg.tune.n_trials
    w = workers if workers is not None else cfg.tune.workers
    check_target(n)
    if w < 1:
        raise ConfigError(f"--workers {w}: must be at least 1")
    check_space(cfg)
    cfg = config_mod.with_overrides(cfg, {"tune.study": name, "tune.n_trials": n, "tune.workers": w})
    url = storage_url(cfg, name, storage)
    removed = pool.clean_stale(study_dir(cfg, name))
    if removed:
        say(f"removed {len(removed)} worker folder(s) left by a killed `diffenc tune`: "
            + ", ".join(str(p) for p in removed))
    handle = study_mod.open_study(cfg, name, make_storage(cfg, url, heartbeat=False), url)
    study_mod.check_same_settings(handle, cfg, url)
    ensure_data(cfg)
    study_mod.record(handle, cfg, n)
    before = study_mod.count(handle)
    ignore: frozenset[int] = frozenset()
    if is_journal(url) and before.running:
        ignore = frozenset(before.running_numbers)
        say(f"[yellow]trials {sorted(ignore)} are RUNNING in a journal file, which has no heartbeat: "
            "if their worker died they stay RUNNING; they are not counted toward the target[/]")
    say(f"study [bold]{name}[/] ({cfg.tune.objective}) in {shown(url)}: {before.finished}/{n} finished"
        + (f", {w} workers" if w > 1 else ""))
    outcome = pool.Outcome()
    if before.finished < n:
        if w == 1:
            work(cfg, name, url, n, 0, ignore)
        else:
            outcome = pool.run_pool(cfg, name, url, n, w, study_dir(cfg, name),
                                    lambda: study_mod.count(handle).finished, ignore)
    result = summarize(handle, url)
    print_study(handle, result)
    done = result["counts"]["finished"]
    resume = result["resume"] or "the same command"
    if outcome.died:
        replaced = f", {outcome.replaced} replaced" if outcome.replaced else ""
        rest = "" if done >= n else f"; run `{resume}` to finish it"
        raise pool.WorkerDied(f"{'; '.join(outcome.died)} during study '{name}'{replaced}; "
                              f"the study has {done}/{n} finished trials{rest}")
    if done < n:
        stopped = f"; worker(s) {', '.join(map(str, outcome.errors))} stopped on the error(s) above" \
            if outcome.errors else ""
        raise DiffencError(
            f"study '{name}' has {done}/{n} finished trials ({result['counts']['running']} still RUNNING)"
            f"{stopped}; run `{resume}` to resume it"
        )
    return result


def stored_study(cfg: Config, study: str | None = None, storage: str | None = None) -> study_mod.Stored | None:
    """The settings an existing study stored; None when there is no such study (nothing is created)
    or it predates stored settings. ``cfg`` only locates the default storage."""
    name = study_name(cfg, study)
    url = storage_url(cfg, name, storage)
    local = local_file(url)
    if local is not None and not local.is_file():
        return None
    try:
        handle = study_mod.load_existing(cfg, name, url)
    except DiffencError:
        return None
    return study_mod.stored(handle)


@quiet_optuna()
def resume_study(
    cfg: Config,
    study: str | None = None,
    storage: str | None = None,
    n_trials: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Continue a study with the configuration, search space, objective and target it stored.

    ``cfg`` only locates the default storage (``train.runs_dir``, ``tune.storage``); a larger
    ``n_trials`` extends the study. An unknown study is a DiffencError.
    """
    name = study_name(cfg, study)
    if n_trials is not None:
        check_target(n_trials)
    url = storage_url(cfg, name, storage)
    settings = study_mod.stored(study_mod.load_existing(cfg, name, url))
    if settings is None:
        raise DiffencError(f"study '{name}' in {shown(url)} stores no settings (it predates `tune resume`): "
                           "re-run the `diffenc tune` command that started it")
    target = n_trials if n_trials is not None else settings.n_trials
    say(f"resuming study [bold]{name}[/] with its stored settings: objective {settings.config.tune.objective}, "
        f"{len(settings.config.tune.space)} dimensions, target {target} finished trials")
    return run_study(settings.config, study=name, storage=url, n_trials=target, workers=workers)
