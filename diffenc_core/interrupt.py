"""How a training that stopped on a signal ends: :class:`Interrupted`, after ``checkpoints/last.pt``.

The fronts (``flows/stopping.py``) catch SIGTERM/SIGINT and ask the loop to stop after its current
step; the loop checkpoints and raises this. Its exit status is the shell's 128 + N (130 for SIGINT,
143 for SIGTERM). A KeyboardInterrupt subclass, so handlers of ordinary errors let it through.
"""

from __future__ import annotations

import signal
from pathlib import Path

from diffenc_core.errors import signal_exit

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
        return signal_exit(self.signum)
