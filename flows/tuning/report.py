"""Showing a study: its counts, the best trial(s) or the Pareto front as tables, the line that
resumes it, and the export of one trial as a params file that reproduces its configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from diffenc_core import config as config_mod
from diffenc_core.config import Config
from diffenc_core.errors import DiffencError
from flows.tuning.output import console, quiet_optuna, say
from flows.tuning.space import study_name
from flows.tuning.storage import shown, storage_url
from flows.tuning.study import ATTR_TARGET, count, load_existing, resume_command, stored

TOP_TRIALS = 10  # rows of the single-objective "top trials" table


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
    """Counts, target, the best trial (or the Pareto front) and the resume command, JSON-ready."""
    c = count(study)
    best = best_trials(study)
    multi = len(study.directions) > 1
    return {
        "study": study.study_name,
        "storage": shown(url),
        "objective": study.user_attrs.get("objective"),
        "metrics": study.user_attrs.get("metrics"),
        "n_trials": study.user_attrs.get(ATTR_TARGET),
        "counts": {"complete": c.complete, "pruned": c.pruned, "failed": c.failed, "running": c.running,
                   "waiting": c.waiting, "finished": c.finished},
        "pareto_front" if multi else "best": [_trial_row(t) for t in (best if multi else best[:1])],
        "resume": resume_command(study, url),
    }


def _short_names(keys: list[str]) -> dict[str, str]:
    """``em.step_size`` -> ``step_size`` where the last part is unambiguous (narrow table columns)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def print_study(study: optuna.Study, summary: dict[str, Any], top: int = TOP_TRIALS) -> None:
    """Counts, the best trial's parameters (single objective), and the top trials / the Pareto front."""
    c = summary["counts"]
    target = f" of {summary['n_trials']}" if summary.get("n_trials") else ""
    say(
        f"study [bold]{summary['study']}[/] ({summary.get('objective')}) in {summary['storage']}: "
        f"{c['finished']}{target} finished ({c['complete']} complete, {c['pruned']} pruned), {c['failed']} failed"
        + (f", {c['running']} running" if c["running"] else "") + (f", {c['waiting']} waiting" if c["waiting"] else "")
    )
    multi = len(study.directions) > 1
    shown = best_trials(study)
    if not shown:
        say("no completed trials yet")
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
    console().print(table)


def print_resume(summary: dict[str, Any]) -> None:
    """The line that continues the study, or why there is none."""
    line = summary.get("resume")
    if line is None:
        say("to resume it: re-run the `diffenc tune` command that started it (this study stores no settings)")
        return
    c, target = summary["counts"], summary.get("n_trials") or 0
    more = f"  (it has its {target} trials: add --n-trials N to extend it)" if c["finished"] >= target else ""
    console().print(f"to resume it: {line}{more}", markup=False, highlight=False, soft_wrap=True)


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
    console().print(table)


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


def export_params(base: Config, trial: FrozenTrial, path: str | Path) -> Path:
    """``base`` (the study's stored configuration) with the trial's parameters applied, as a params file.

    The result is the trial's own configuration except the keys the tuner sets per trial (its run
    name and folder, ``tune.trial_steps`` instead of ``train.steps``, the validation interval).
    """
    tuned = config_mod.with_overrides(base, dict(trial.params))
    path = Path(path)
    if path.is_dir():
        raise DiffencError(f"--export {path}: is a folder (give the params file's name, e.g. tuned.yaml)")
    try:
        config_mod.dump(tuned, path)
    except OSError as err:
        raise DiffencError(f"--export {path}: cannot write it ({err.strerror or err})") from None
    except DiffencError as err:  # the atomic write's own one-line error (read-only folder, full disk)
        raise DiffencError(f"--export {path}: {err}") from None
    return path


@quiet_optuna()
def show_study(
    cfg: Config,
    study: str | None = None,
    storage: str | None = None,
    export: str | Path | None = None,
    trial: int | None = None,
) -> dict[str, Any]:
    """Print the best trial(s) / Pareto front and the resume line; with ``export``, write a params file."""
    name = study_name(cfg, study)
    url = storage_url(cfg, name, storage)
    handle = load_existing(cfg, name, url)
    summary = summarize(handle, url)
    print_study(handle, summary)
    print_resume(summary)
    if export is not None:
        chosen = choose_export(handle, trial)
        settings = stored(handle)
        if settings is None:
            say("[yellow]this study stores no settings (it predates them): exporting with the current "
                "params file and --set values[/]", stderr=True)
        out = export_params(settings.config if settings else cfg, chosen, export)
        if len(handle.directions) > 1 or trial is not None:
            print_trial(chosen, summary.get("metrics") or [], title=f"exported trial: {chosen.number}")
        say(f"wrote [bold]{out}[/] (trial {chosen.number}): `diffenc train --params {out}`, or "
            f"`cp {out} params.yaml && dvc exp run`")
        summary["export"] = {"path": str(out), "trial": chosen.number}
    return summary
