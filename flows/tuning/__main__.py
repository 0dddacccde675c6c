"""``python -m flows.tuning worker ...``: one worker process of ``diffenc tune --workers N``."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from rich.markup import escape

from diffenc_core import config as config_mod
from diffenc_core.errors import USER_ERROR_EXIT, DiffencError, signal_exit
from flows.tuning.output import say
from flows.tuning.worker import work


def main(argv: list[str] | None = None) -> int:
    """``worker --config FILE --study NAME --storage URL --n-trials N --index I --parent PID``."""
    parser = argparse.ArgumentParser(prog="python -m flows.tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="one tuning worker process (started by `diffenc tune --workers N`)")
    w.add_argument("--config", required=True)
    w.add_argument("--study", required=True)
    w.add_argument("--storage", required=True)
    w.add_argument("--n-trials", type=int, required=True)
    w.add_argument("--index", type=int, default=0)
    w.add_argument("--parent", type=int, default=None, help="stop once this process (the pool) is gone")
    w.add_argument("--ignore-running", default="")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
        if cfg.train.threads > 0:
            import torch

            torch.set_num_threads(cfg.train.threads)
        say(f"[dim]worker {args.index}[/] started (pid {os.getpid()})")
        ignore = frozenset(int(x) for x in args.ignore_running.split(",") if x)
        work(cfg, args.study, args.storage, args.n_trials, args.index, ignore, parent=args.parent)
    except DiffencError as err:
        say(f"[bold red]error:[/] worker {args.index}: {escape(str(err))}", stderr=True)
        return USER_ERROR_EXIT  # its message is on stderr; the pool does not replace it
    except KeyboardInterrupt:
        return signal_exit(signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
