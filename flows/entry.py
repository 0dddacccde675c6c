"""The entry points shared by the CLI, the DVC stages and the Prefect tasks (one implementation).

Each takes a validated ``Config`` and returns a path or a flat dict, so callers pass paths,
not tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from diffenc_core import data, distributed, evaluate, runs, runstart, trainer
from diffenc_core.config import Config
from flows import launch
from flows.stopping import Signals, stop_hook

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
    stop_signals: bool = False,
) -> Path:
    """Train ``cfg.train.method`` into ``runs/<run>/`` and return the run directory.

    Neither flag: a new run (a folder that already holds one is refused); ``resume``: continue it
    (or start fresh when there is none); ``overwrite``: replace it (see :mod:`diffenc_core.runstart`).
    The line saying which goes to this module's logger; ``progress`` logs a line per log
    step; ``live_dir`` mirrors the history into dvclive; ``stop_signals`` stops cleanly on SIGTERM/SIGINT
    (:class:`diffenc_core.interrupt.Interrupted`). With ``train.nproc`` > 1 it starts that many processes
    (:mod:`flows.launch`); inside a torchrun job (one of those, or the user's own ``torchrun``) it is one
    rank of the training.
    """
    start = runstart.mode(resume, overwrite)
    if cfg.train.nproc > 1 and not distributed.launched():
        return launch.train(cfg, start, progress=progress, on_log=on_log, on_validate=on_validate,
                            live_dir=live_dir)
    cuda = distributed.launched() and trainer.device_for(cfg).type == "cuda"
    world = distributed.join(cfg.train.dist_timeout_s, cuda=cuda)
    signals = Signals() if stop_signals else None
    callbacks: list[trainer.Callback] = [on_log] if on_log is not None else []
    live = None
    try:
        plan = world.from_main(lambda: runstart.plan(cfg, start))
        if plan.message and world.is_main and not distributed.launched_by_diffenc():
            log.info(plan.message)  # fronts show the 'flows' logger: the CLI on the terminal, Prefect in its run logs
        if live_dir is not None and world.is_main:
            from flows.dvclive_log import LiveLogger

            live = LiveLogger(live_dir, resume=plan.resume)
            callbacks.append(live)
        if distributed.launched_by_diffenc():  # `diffenc train --nproc`: rows to the launcher, its stop request
            callbacks.append(launch.report_row)
        run = trainer.train(cfg, plan, progress=progress, on_log=_each(callbacks), on_validate=on_validate,
                            stop_requested=stop_hook(signals, launch.stop_request_file()))
    finally:
        if signals is not None:
            signals.uninstall()
        if live is not None:
            live.close()
        distributed.leave()
    return run.path


def _each(callbacks: list[trainer.Callback]) -> trainer.Callback | None:
    """One callback that calls each of ``callbacks`` in turn (None for none)."""
    if not callbacks:
        return None

    def call(step: int, row: dict[str, float]) -> None:
        for callback in callbacks:
            callback(step, row)

    return call


def evaluate_entry(cfg: Config, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a trained run (default: the one ``cfg.train`` names) and return its metrics."""
    run = runs.open_run(run_dir) if run_dir is not None else None
    return evaluate.evaluate(cfg, run)
