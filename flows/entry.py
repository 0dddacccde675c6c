"""The entry points shared by the CLI, the DVC stages and the Prefect tasks (one implementation).

Each takes a validated ``Config`` and returns a path or a flat dict, so callers pass paths,
not tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffenc_core import data, evaluate, runs, trainer
from diffenc_core.config import Config


def prepare_entry(cfg: Config) -> Path:
    """Prepare ``cfg.data`` and return the prepared folder."""
    return data.prepare(cfg.data)


def train_entry(
    cfg: Config,
    resume: bool = False,
    progress: bool = True,
    on_log: trainer.Callback | None = None,
    on_validate: trainer.Callback | None = None,
) -> Path:
    """Train ``cfg.train.method`` into ``runs/<run>/`` and return the run directory."""
    run = trainer.train(cfg, resume=resume, progress=progress, on_log=on_log, on_validate=on_validate)
    return run.path


def evaluate_entry(cfg: Config, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a trained run (default: the one ``cfg.train`` names) and return its metrics."""
    run = runs.open_run(run_dir) if run_dir is not None else None
    return evaluate.evaluate(cfg, run)
