"""How a training run starts: fresh, resumed from its checkpoint, or replacing an old run.

One decision for every front (CLI, DVC stages, Prefect flows, tuning, benchmarks), so they agree.
A run is ``<train.runs_dir>/<train.run>`` (``train.run`` defaults to the method; :func:`run_path`):

- ``new`` (the default): the folder must not hold a run yet; if it does, nothing is touched and
  the message names ``--resume``, ``--overwrite`` and ``train.run``.
- ``resume``: continue from ``checkpoints/last.pt``. The settings must match the run's own
  (``params.yaml``, else the checkpoint's), except :data:`diffenc_core.config.RESUME_FREE`; otherwise
  the changed keys are named (``model.latent_dim: 8 → 4``). A run that does not exist, or that stopped
  before its first checkpoint without finishing, starts fresh and says so. A run that trains further
  drops its old evaluation (metrics.json, tables, plots): they measured a checkpoint it moves past.
- ``overwrite``: remove every file of the old run (``live/`` included), then start fresh.

:func:`plan` only reads (``params.yaml`` and ``status.json``; the checkpoint only for a run whose status
does not record its step); :func:`begin` carries the plan out (removal, folders) and logs the
replacement once it is done.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffenc_core import config, data, runs
from diffenc_core.config import Config, from_stored
from diffenc_core.errors import CheckpointError, ConfigError, DataError, RunError

Start = Literal["new", "resume", "overwrite"]

SHOWN_CHANGES = 6  # changed keys named in one message; the rest are counted
LAST = "last.pt"
CHECKPOINT_STEP = "checkpoint_step"
"""The status.json field the trainer sets each time it writes ``checkpoints/last.pt``: that checkpoint's step."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What :func:`begin` will do with a run folder, and the lines that say so."""

    run_dir: Path
    resume: bool  # continue from checkpoints/last.pt (else start from nothing)
    step: int  # the step it continues from (0 when fresh)
    clear: bool  # remove the files an old or unfinished run left first
    message: str  # said when the run starts (empty: nothing worth a line)
    cleared: str = ""  # logged by begin() once the old files are gone (only then is it true)
    drop_evaluation: bool = False  # a resume that trains further: the old evaluation's files go


def mode(resume: bool = False, overwrite: bool = False) -> Start:
    """The start mode of the ``--resume`` / ``--overwrite`` flags (or flow parameters)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or replace it")
    return "resume" if resume else "overwrite" if overwrite else "new"


def run_path(runs_dir: str | Path, name: str, key: str = "train.run") -> Path:
    """The folder of run ``name`` (``train.run`` or ``train.warm_start``, named by ``key`` in errors).

    One rule for both: ``runs_dir/name``, or where it links to if that lies inside ``runs_dir`` (a link to
    another run or a tuning trial); a link that leads out of ``runs_dir``, or to nothing, is a ConfigError.
    """
    root = Path(runs_dir)
    path = root / name
    if not path.is_symlink():
        return path
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} is a link to {os.readlink(path)}, which does not exist") from None
    except (OSError, RuntimeError) as err:
        raise ConfigError(f"{key}: {path} is a link that cannot be followed ({err})") from None
    if root.resolve() not in target.parents:
        raise ConfigError(f"{key}: {path} resolves outside train.runs_dir ({root}), to {target}; "
                          "a run name may link only to a folder inside it")
    return target


def run_dir(cfg: Config) -> Path:
    """The folder of ``cfg``'s run (:func:`run_path` of ``train.run``)."""
    return run_path(cfg.train.runs_dir, cfg.train.run_name)


def ignored_on_resume(key: str) -> bool:
    """Whether the dotted ``key`` may differ between a run and its resume."""
    return config.is_free(key, config.RESUME_FREE)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every setting that differs and matters for a resume."""
    old, new = config.flatten(before), config.flatten(after)
    missing = "(unset)"
    return [f"{k}: {_show(old.get(k, missing))} → {_show(new.get(k, missing))}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not ignored_on_resume(k)]


def _resolved(tree: dict[str, Any]) -> dict[str, Any]:
    """A run's stored settings with today's defaults filled in (as stored if they no longer validate)."""
    try:
        return from_stored(tree).to_dict()
    except ConfigError:
        return tree


def as_trained(stored: dict[str, Any], wanted: dict[str, Any], n_train: int | None) -> list[dict[str, Any]]:
    """Both settings as the training reads them, so a changed default it does not read stops no resume: a VAE
    run reads neither ``em`` nor ``model.encoder``; ``em.m_step: auto`` is what it resolves to for ``n_train``."""
    trees = [copy.deepcopy(stored), copy.deepcopy(wanted)]
    both_vae = all(t.get("train", {}).get("method") == "vae" for t in trees)
    for tree in trees:
        if both_vae:
            tree.pop("em", None)
            tree.get("model", {}).pop("encoder", None)
        elif n_train is not None and isinstance(tree.get("em"), dict) and "m_step" in tree["em"]:
            tree["em"]["m_step"] = config.resolve_m_step(tree["em"]["m_step"], n_train)
    return trees


def _n_train(cfg: Config) -> int | None:
    """The prepared training set's size (None before ``prepare``: the settings then compare as written)."""
    try:
        return int(data.read_manifest(cfg.data.prepared_dir)["sizes"].get("train"))
    except (DataError, TypeError):
        return None


class _Stored:
    """What a run folder says about how it was trained and how far: ``params.yaml`` and ``status.json``,
    the checkpoint only for what they lack (runs from before status.json recorded the step), read once."""

    def __init__(self, path: Path):
        self.path, self.run = path, runs.Run(path)
        self._state: dict[str, Any] | None = None

    def checkpoint(self) -> dict[str, Any]:
        from diffenc_core import checkpoint

        if self._state is None:
            self._state = checkpoint.load(self.path / runs.CHECKPOINTS / LAST)
        return self._state

    def settings(self) -> dict[str, Any]:
        params = self.run.params()
        if params:
            return params
        config_tree = self.checkpoint().get("config")
        if isinstance(config_tree, dict):
            return config_tree
        raise RunError(f"{self.path}: neither params.yaml nor its checkpoint say how it was trained; "
                       "replace it with --overwrite or choose another train.run")

    def step(self) -> int:
        recorded = self.run.status().get(CHECKPOINT_STEP)
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 0:
            return recorded
        step = self.checkpoint().get("step")
        if not isinstance(step, int):
            raise CheckpointError(f"{self.path / runs.CHECKPOINTS / LAST}: holds no step count; "
                                  "it is not a resumable diffenc checkpoint")
        return step


def plan(cfg: Config, start: Start = "new") -> Plan:
    """Decide how ``cfg``'s run starts, reading only; a refusal is a DiffencError naming the way out."""
    if start not in ("new", "resume", "overwrite"):
        raise ConfigError(f"start mode must be new, resume or overwrite, not {start!r}")
    path = run_dir(cfg)
    name = cfg.train.run_name
    exists = runs.holds_run(path)
    if start != "resume" and cfg.train.warm_start is not None and cfg.train.method == "diffusion":
        run_path(cfg.train.runs_dir, cfg.train.warm_start, "train.warm_start")  # refused before anything is removed
    if start == "overwrite":
        return Plan(path, False, 0, exists, "",
                    f"replacing {path} (every file of the old run removed)" if exists else "")
    if start == "new":
        if exists:
            state = runs.Run(path).status().get("state", "unknown") if path.is_dir() else "not a folder"
            raise RunError(
                f"{path} already holds a run ({state}): continue it with --resume, replace it with --overwrite, "
                f"or name a new one with --set train.run=NAME"
            )
        return Plan(path, False, 0, False, "")
    if not (path / runs.CHECKPOINTS / LAST).is_file():
        if not exists:
            return Plan(path, False, 0, False, f"{path} has no run to resume: starting it fresh")
        if runs.Run(path).status().get("state") == "done":
            raise RunError(f"{path}: finished, but has no checkpoints/{LAST} to resume from; replace it with "
                           "--overwrite or name a new one with --set train.run=NAME")
        return Plan(path, False, 0, True, "", f"{path} stopped before its first checkpoint: starting it afresh")
    stored = _Stored(path)
    n_train = _n_train(cfg)
    changes = changed_keys(*as_trained(_resolved(stored.settings()), cfg.to_dict(), n_train))
    if changes:
        more = f" (and {len(changes) - SHOWN_CHANGES} more)" if len(changes) > SHOWN_CHANGES else ""
        raise ConfigError(
            f"{path}: cannot resume, it was trained with other settings: {'; '.join(changes[:SHOWN_CHANGES])}{more}. "
            "Resume it with its own settings, replace it with --overwrite, or name a new one with --set train.run=NAME"
        )
    step = stored.step()
    return Plan(path, True, step, False, f"resuming {name} from step {step}",
                drop_evaluation=step < cfg.total_steps)


def begin(p: Plan) -> runs.Run:
    """Carry out ``p``: remove what the old run left when starting fresh (or its stale evaluation when
    it trains further), then open the folder."""
    if p.clear:
        runs.remove(p.run_dir)
        if p.cleared:
            log.info(p.cleared)
    elif p.drop_evaluation:
        dropped = runs.remove_evaluation(p.run_dir)
        if dropped:
            log.info("%s trains further: removed its evaluation of the earlier checkpoint (%s)", p.run_dir.name,
                     ", ".join(dropped))
    return runs.create(p.run_dir.parent, p.run_dir.name)
