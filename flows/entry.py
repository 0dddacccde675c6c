"""The entry points shared by the CLI, the DVC stages and the Prefect tasks (one implementation).

Each takes a validated ``Config`` and returns a path or a flat dict, so callers pass paths,
not tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffenc_core import data, distributed, evaluate, runs, runstart, trainer
from diffenc_core.config import Config

log = logging.getLogger(__name__)


def prepare_entry(cfg: Config) -> Path:
    """Prepare ``cfg.data`` and return the prepared folder."""
    return data.prepare(cfg.data)


def train_entry(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_log: trainer.Callback | None = None,
    on_validate: trainer.Callback | None = None,
    live_dir: str | Path | None = None,
    say: Callable[[str], None] | None = None,
    stop_signals: bool = False,
) -> Path:
    """Train ``cfg.train.method`` into ``runs/<run>/`` and return the run directory.

    Neither flag: a new run (a folder that already holds one is refused); ``resume``: continue it
    (or start fresh when there is none); ``overwrite``: replace it (see :mod:`diffenc_core.runstart`).
    ``say`` gets the one line saying which; ``live_dir`` mirrors the history into dvclive;
    ``stop_signals`` stops cleanly on SIGTERM/SIGINT (:class:`diffenc_core.interrupt.Interrupted`).
    With ``train.nproc`` > 1 it starts that many processes (:mod:`flows.launch`); inside a torchrun job
    (one of those, or the user's own ``torchrun``) it is one rank of the training.
    """
    start = runstart.mode(resume, overwrite)
    if cfg.train.nproc > 1 and not distributed.launched():
        from flows import launch

        return launch.train(cfg, start, progress=progress, on_log=on_log, on_validate=on_validate,
                            live_dir=live_dir, say=say)
    cuda = distributed.launched() and trainer.device_for(cfg).type == "cuda"
    world = distributed.join(cfg.train.dist_timeout_s, cuda=cuda)
    live = None
    try:
        plan = world.from_main(lambda: runstart.plan(cfg, start))
        if plan.message and world.is_main and not distributed.launched_by_diffenc():
            log.info(plan.message)  # fronts show the 'flows' logger: the CLI on the terminal, Prefect in its run logs
            if say is not None:
                say(plan.message)
        if live_dir is not None and world.is_main:
            from flows.dvclive_log import LiveLogger

            live = LiveLogger(live_dir, resume=plan.resume)

        def log(step: int, row: dict[str, float]) -> None:
            if on_log is not None:
                on_log(step, row)
            if live is not None:
                live(step, row)

        run = trainer.train(cfg, plan, progress=progress, on_log=log, on_validate=on_validate,
                            stop_signals=stop_signals)
    finally:
        if live is not None:
            live.close()
        distributed.leave()
    return run.path


def evaluate_entry(cfg: Config, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a trained run (default: the one ``cfg.train`` names) and return its metrics."""
    run = runs.open_run(run_dir) if run_dir is not None else None
    return evaluate.evaluate(cfg, run)
