"""How a training run starts: fresh, resumed from its checkpoint, or replacing an old run.

One decision for every front (CLI, DVC stages, Prefect flows, tuning, benchmarks), so they agree.
A run is ``<train.runs_dir>/<train.run>`` (``train.run`` defaults to the method):

- ``new`` (the default): the folder must not hold a run yet; if it does, nothing is touched and
  the message names ``--resume``, ``--overwrite`` and ``train.run``.
- ``resume``: continue from ``checkpoints/last.pt``. The settings must match the run's own
  (``params.yaml``, else the checkpoint's), except :data:`RESUME_IGNORES`; otherwise the changed
  keys are named (``model.latent_dim: 8 → 4``). A run that does not exist, or that stopped
  before its first checkpoint without finishing, starts fresh and says so.
- ``overwrite``: remove every file of the old run (``live/`` included), then start fresh.

:func:`plan` only reads; :func:`begin` carries the plan out (removal, folders).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffenc_core import runs
from diffenc_core.config import Config, from_dict
from diffenc_core.errors import CheckpointError, ConfigError, RunError

Start = Literal["new", "resume", "overwrite"]

RESUME_IGNORES = ("train.steps", "train.time_budget_s", "train.threads", "train.device", "train.nproc",
                  "train.dist_timeout_s", "train.run", "train.runs_dir", "data.root", "eval.", "tune.")
"""Keys that may differ between a run and its resume: the budget, threads, device, processes, the run's and
the prepared data's location, and what evaluation or tuning do (entries ending in a dot are sections)."""

SHOWN_CHANGES = 6  # changed keys named in one message; the rest are counted
LAST = "last.pt"


@dataclass(frozen=True)
class Plan:
    """What :func:`begin` will do with a run folder, and the line that says so."""

    run_dir: Path
    resume: bool  # continue from checkpoints/last.pt (else start from nothing)
    step: int  # the step it continues from (0 when fresh)
    clear: bool  # remove the files an old or unfinished run left first
    message: str  # empty for a plain new run: nothing worth a line


def mode(resume: bool = False, overwrite: bool = False) -> Start:
    """The start mode of the ``--resume`` / ``--overwrite`` flags (or flow parameters)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run, or replace it")
    return "resume" if resume else "overwrite" if overwrite else "new"


def run_dir(cfg: Config) -> Path:
    """``runs_dir/run``, refused when it resolves elsewhere (a symlink out of ``train.runs_dir``)."""
    root = Path(cfg.train.runs_dir)
    path = root / cfg.train.run_name
    if path.is_symlink() or (path.exists() and path.resolve().parent != root.resolve()):
        raise ConfigError(f"train.run: {path} resolves outside train.runs_dir ({root}); name a run folder "
                          "that is not a link")
    return path


def ignored_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_IGNORES)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not (prefix + key).startswith("tune."):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every setting that differs and matters for a resume."""
    old, new = _flat(before), _flat(after)
    missing = "(unset)"
    return [f"{k}: {_show(old.get(k, missing))} → {_show(new.get(k, missing))}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not ignored_on_resume(k)]


def _resolved(tree: dict[str, Any]) -> dict[str, Any]:
    """A run's stored settings with today's defaults filled in (as stored if they no longer validate)."""
    try:
        return from_dict(tree).to_dict()
    except ConfigError:
        return tree


def _stored_settings(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    params = runs.Run(path).params()
    if params:
        return params
    if isinstance(state.get("config"), dict):
        return state["config"]
    raise RunError(f"{path}: neither params.yaml nor its checkpoint say how it was trained; "
                   "replace it with --overwrite or choose another train.run")


def plan(cfg: Config, start: Start = "new") -> Plan:
    """Decide how ``cfg``'s run starts, reading only; a refusal is a DiffencError naming the way out."""
    from diffenc_core import checkpoint

    if start not in ("new", "resume", "overwrite"):
        raise ConfigError(f"start mode must be new, resume or overwrite, not {start!r}")
    path = run_dir(cfg)
    name = cfg.train.run_name
    exists = runs.holds_run(path)
    if start == "overwrite":
        return Plan(path, False, 0, exists, f"replacing {path} (every file of the old run removed)" if exists
                    else "")
    if start == "new":
        if exists:
            state = runs.Run(path).status().get("state", "unknown") if path.is_dir() else "not a folder"
            raise RunError(
                f"{path} already holds a run ({state}): continue it with --resume, replace it with --overwrite, "
                f"or name a new one with --set train.run=NAME"
            )
        return Plan(path, False, 0, False, "")
    last = path / runs.CHECKPOINTS / LAST
    if not last.is_file():
        if not exists:
            return Plan(path, False, 0, False, f"{path} has no run to resume: starting it fresh")
        if runs.Run(path).status().get("state") == "done":
            raise RunError(f"{path}: finished, but has no checkpoints/{LAST} to resume from; replace it with "
                           "--overwrite or name a new one with --set train.run=NAME")
        return Plan(path, False, 0, True, f"{path} stopped before its first checkpoint: starting it afresh")
    state = checkpoint.load(last)
    changes = changed_keys(_resolved(_stored_settings(path, state)), cfg.to_dict())
    if changes:
        more = f" (and {len(changes) - SHOWN_CHANGES} more)" if len(changes) > SHOWN_CHANGES else ""
        raise ConfigError(
            f"{path}: cannot resume, it was trained with other settings: {'; '.join(changes[:SHOWN_CHANGES])}{more}. "
            "Resume it with its own settings, replace it with --overwrite, or name a new one with --set train.run=NAME"
        )
    step = state.get("step")
    if not isinstance(step, int):
        raise CheckpointError(f"{last}: holds no step count; it is not a resumable diffenc checkpoint")
    return Plan(path, True, step, False, f"resuming {name} from step {step}")


def begin(p: Plan) -> runs.Run:
    """Carry out ``p``: remove what the old run left when starting fresh, then open the folder."""
    if p.clear:
        runs.remove(p.run_dir)
    return runs.create(p.run_dir.parent, p.run_dir.name)
