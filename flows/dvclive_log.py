"""Per-step training curves through dvclive (``diffenc train --live DIR``).

Kept out of ``diffenc_core`` (which never imports dvc/dvclive): the trainer calls
``on_log(step, row)`` at every logged step and this callback writes one dvclive TSV per metric
under ``DIR/plots/metrics/<name>.tsv`` (x = training step) plus the latest values in
``DIR/metrics.json``. ``dvc.yaml`` declares those files itself, so ``dvcyaml=False``: dvclive
never rewrites the pipeline file, and ``save_dvc_exp=False``: it never creates experiments
(``dvc exp run`` does that).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SKIP = frozenset({"step", "epoch"})


class LiveLogger:
    """An ``on_log`` callback that mirrors each history row into dvclive; ``close()`` at the end.

    dvclive opens its folder at the first logged step, not before: a run that replaces an old one
    (``--overwrite``) removes the old ``live/`` first, and a run refused at the start writes nothing.
    """

    def __init__(self, directory: str | Path, resume: bool = False):
        self.dir = Path(directory)
        self.resume = resume
        self.live: Any = None

    def __call__(self, step: int, row: dict[str, Any]) -> None:
        if self.live is None:
            from dvclive import Live

            self.live = Live(dir=str(self.dir), resume=self.resume, report=None, save_dvc_exp=False, dvcyaml=False)
        self.live.step = int(step)
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            value = float(value)
            if math.isfinite(value):
                self.live.log_metric(key, value)
        self.live.sync()  # summary (and DVC Studio live updates, when configured)

    def close(self) -> None:
        if self.live is not None:
            self.live.end()

    def __enter__(self) -> LiveLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
