"""What tuning prints: a rich Console that is never cut at 80 columns when stdout is a file or a
pipe (log files, CI, Prefect logs), and Optuna's own log turned down to errors."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

import optuna
from rich.console import Console

PIPE_COLUMNS = 400
"""Console width when the stream is not a terminal (and ``COLUMNS`` is unset): rich would otherwise
assume 80 and squeeze or cut the trial tables; tables only take the width they need."""


def console(stderr: bool = False) -> Console:
    """A Console on the current stdout (or stderr), made per call so a redirected stream is seen."""
    stream = sys.stderr if stderr else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    wide = not tty and not os.environ.get("COLUMNS")
    return Console(stderr=stderr, width=PIPE_COLUMNS if wide else None)


def say(text: str, stderr: bool = False) -> None:
    """One line of progress (rich markup allowed), never re-wrapped or highlighted."""
    console(stderr).print(text, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Our own one line per trial instead of Optuna's INFO/WARNING log, and no ExperimentalWarning
    for the heartbeat API we rely on on purpose (both restored afterwards)."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)
