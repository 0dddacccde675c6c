"""How the fronts ask a training to stop: SIGTERM/SIGINT, and a launcher's request to its processes.

:class:`Signals` records the first SIGTERM/SIGINT (handlers in the main thread only), so the loop
stops between two steps with a checkpoint; a second signal raises KeyboardInterrupt at once, for a
user who will not wait. :func:`stop_hook` is what the loop asks after every step
(``trainer.StopHook``): a signal number, the reason in a request file, or None.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from diffenc_core.interrupt import STOP_SIGNALS
from diffenc_core.trainer import StopHook


class Signals:
    """Records SIGTERM/SIGINT while installed; ``signum`` is the first one received (or None)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._before: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: stop now, without the checkpoint
        self.signum = signum

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._before = {}


def stop_hook(signals: Signals | None, request: Path | None = None) -> StopHook:
    """The loop's stop question: a recorded signal first, then a request file's reason (its text)."""

    def ask() -> int | str | None:
        if signals is not None and signals.signum is not None:
            return signals.signum
        if request is not None and request.is_file():
            with contextlib.suppress(OSError):
                return request.read_text().strip() or "stopped on request"
            return "stopped on request"
        return None

    return ask
