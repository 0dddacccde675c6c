"""The user-facing errors, each carrying one message that names the key, file or run at fault, and
the exit statuses every front ends with (one table, so the CLI, the launcher and the workers agree)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FAILED_EXIT = 1
"""Failed for a reason that is not the user's (a process died or hung), or stopped because a peer did."""
USER_ERROR_EXIT = 2
"""A user mistake (a :class:`DiffencError`): one line says which."""
WORKER_DIED_EXIT = 3
"""``diffenc tune``: a worker process died during the study (even if it was replaced)."""
SIGNAL_EXIT_BASE = 128
"""A process stopped by signal N exits with 128 + N, by shell convention: 130 for SIGINT, 143 for SIGTERM."""


def signal_exit(signum: int) -> int:
    """The exit status of a process stopped by ``signum``."""
    return SIGNAL_EXIT_BASE + int(signum)


class DiffencError(Exception):
    """A mistake in what the user handed us (config, data file, checkpoint, run name)."""


class ConfigError(DiffencError):
    """A bad key or value in params.yaml or a --set override."""


class DataError(DiffencError):
    """A missing, malformed or inconsistent data file."""


class CheckpointError(DiffencError):
    """A missing, corrupt or foreign checkpoint."""


class RunError(DiffencError):
    """An unknown or unreadable run directory."""


class DivergenceError(DiffencError):
    """Training produced non-finite values and could not recover."""


class StorageError(DiffencError):
    """A file or folder that cannot be written: read-only, full, no permission, a file in the way."""


class JobError(RuntimeError):
    """A training job of several processes failed for a reason that is not a user mistake (a process
    died, was killed or hung): one line, exit status ``exit_code``."""

    exit_code = FAILED_EXIT


class PeerStopped(Exception):  # noqa: N818 - a way of stopping, like StopIteration
    """This process of a job stops because the job does: another process failed and reports it, or
    every process hit the same error and rank 0 reports it. Nothing to print; exit with ``exit_code``."""

    def __init__(self, exit_code: int, reason: str):
        super().__init__(reason)
        self.exit_code = exit_code
        self.reason = reason


# A write that fails for one of these reasons is the user's to fix (a read-only or full disk, a
# file where a folder belongs), so it is a StorageError; any other OSError stays one (transient).
USER_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                         errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG})
IN_THE_WAY = "a file stands where a folder is needed"
REASONS = {errno.ENOTDIR: IN_THE_WAY, errno.EEXIST: IN_THE_WAY}  # plainer than the C library's words


@contextmanager
def writing(path: str | Path, hint: str = "") -> Iterator[None]:
    """Turn a write to ``path`` that fails for a user-fixable reason into one StorageError line."""
    try:
        yield
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        where = err.filename or path
        more = f"; {hint}" if hint else ""
        reason = REASONS.get(err.errno) or os.strerror(err.errno)
        raise StorageError(f"{where}: cannot write ({reason}){more}") from None
