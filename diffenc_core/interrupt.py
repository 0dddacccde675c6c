"""Stopping a training cleanly on SIGTERM or SIGINT: finish the step, checkpoint, say so, exit.

:class:`StopRequest` installs handlers (in the main thread only; elsewhere it never fires) that
only record the signal, so the training loop stops between two steps; a second signal raises
KeyboardInterrupt at once, for a user who will not wait. :class:`Interrupted` is what the loop
raises afterwards; its exit status is the shell's 128 + N (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_EXIT_BASE = 128  # a process ended by signal N exits with 128 + N, by shell convention


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving ``checkpoints/last.pt`` (a stop request, not an error)."""

    def __init__(self, signum: int, step: int, run_dir: Path, saved: bool):
        self.signum, self.step, self.run_dir, self.saved = signum, step, run_dir, saved
        what = f"{run_dir}/checkpoints/last.pt saved" if saved else "no checkpoint yet"
        super().__init__(f"{self.signal_name} at step {step}: {what}; status 'interrupted'. "
                         "Continue it with `diffenc train --resume` and the same settings")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return SIGNAL_EXIT_BASE + self.signum


class StopRequest:
    """Records SIGTERM/SIGINT while installed; ``signum`` is the first one received (or None)."""

    def __init__(self, enabled: bool = True):
        self.signum: int | None = None
        self._before: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now, without the checkpoint
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._before = {}
