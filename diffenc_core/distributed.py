"""Data-parallel training over processes with torch.distributed: the job, its shards, its agreements.

A job is ``size`` processes (ranks) started by torchrun's agent (``torchrun``, or ``diffenc train
--nproc N``, which runs the same agent itself): gloo on CPU, NCCL (and gloo for CPU tensors) on
CUDA, one device per local rank. DistributedDataParallel averages the gradients; this module holds
the rest of what the trainer needs, and collapses to plain code in one process (``World()``):

- **shares**: a step's global batch (``train.batch_size``, the same batches as in one process) is cut
  into ``size`` equal contiguous parts, one per rank (:meth:`World.share`), so DDP's plain gradient
  average is the gradient of the global-batch mean;
- **replicated state**: every rank holds every training example and every example's E-step chain;
  after its E-step each rank sends its part's ``(idx, z*, step size)`` to all (one all-gather,
  :meth:`World.all_gather_rows`), so the chains stay identical everywhere and a checkpoint is rank 0's;
- **agreement**: stop requests, the elapsed time, a log step's statistics and setup errors are decided
  together, so every rank takes the same branch (no rank waits in a collective the others skipped);
- **failures**: the first rank that fails records itself as the root cause in the job's store; the
  others stop quietly (:class:`PeerStopped`). Collectives time out (``train.dist_timeout_s``), and a
  dead peer is noticed at once, so a failing rank ends the job with one message and never a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from diffenc_core import errors
from diffenc_core.errors import FAILED_EXIT, USER_ERROR_EXIT, ConfigError, DiffencError, JobError, PeerStopped

T = TypeVar("T")

LAUNCHED_ENV = "DIFFENC_LAUNCHED"
"""Set by ``diffenc train --nproc`` for its ranks: the launcher reports the outcome, the ranks stay quiet."""
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun's agent reads a failed rank's message
ROOT_CAUSE_KEY = "diffenc/root-cause"
STORE_TIMEOUT_S = 10.0  # a job store that does not answer within this is gone (its agent died)
MAX_STATS = frozenset({"retries"})  # step statistics merged by their maximum, not the mean over ranks
PR_SET_PDEATHSIG = 1  # linux/prctl.h
COLLECTIVE_MARKS = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer")


class LossModule(nn.Module):
    """One training loss as a module whose parameters are exactly those it trains: what
    DistributedDataParallel wraps, so its gradient hooks average them over the ranks."""

    def __init__(self, loss: Callable[..., Any], **modules: nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.loss = loss

    def forward(self, *args: Any) -> Any:
        return self.loss(*args)


class DataParallelMethod:
    """What a training method shares with a job of several processes: its losses (a :class:`LossModule`
    each, kept in a plain dict so the state dict keeps its keys) and the job it trains in."""

    losses: dict[str, nn.Module]
    world: World  # set below the class: the one-process world until ``distribute``

    def distribute(self, world: World) -> None:
        """Train in ``world``: every loss through DistributedDataParallel when several processes train."""
        self.world = world
        self.losses = {name: world.wrap(module) for name, module in self.losses.items()}


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for not broadcasting buffers every forward (renamed in newer torch); the wrapped
    losses' buffers are constants, identical on every rank."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream from ``step`` on: distinct per rank, reproducible."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank]).generate_state(1)[0])


def exit_code(err: BaseException) -> int:
    """The CLI's exit status for ``err``."""
    if isinstance(err, PeerStopped | JobError):
        return err.exit_code
    return USER_ERROR_EXIT if isinstance(err, DiffencError) else FAILED_EXIT


def one_line(err: BaseException) -> str:
    """``Name: first line of the message``: what a status file and the job's root-cause record hold."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def error_class(name: str) -> type[DiffencError] | None:
    """The DiffencError subclass called ``name`` (the first word of a recorded message), if any."""
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, DiffencError) else None


def _collective_failure(err: BaseException) -> bool:
    """Whether ``err`` came out of a collective whose peer died or timed out (not this rank's own fault)."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(mark in str(err) for mark in COLLECTIVE_MARKS))


def _backend_reason(err: BaseException) -> str:
    """The gist of a backend's error: its first sentence, without the ``[source.cc:123]`` in front."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


@dataclass(frozen=True)
class World:
    """This process's place in the job; every collective below is a no-op in one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: Any = None  # the job's key-value store (the root-cause record); None in one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------------------ shares
    def check_batch(self, batch_size: int, n_train: int) -> None:
        """The global batch must split into equal shares (so the gradient average is the batch mean)."""
        if self.parallel and (batch_size % self.size or n_train < batch_size):
            raise ConfigError(f"train.batch_size: {batch_size} must be a multiple of the {self.size} processes and "
                              f"at most the {n_train} training examples")

    def share(self, idx: Tensor) -> Tensor:
        """This rank's part of the global batch ``idx``: the ``rank``-th of ``size`` equal contiguous parts."""
        return idx if not self.parallel else idx.tensor_split(self.size)[self.rank]

    def all_gather_rows(self, *parts: Tensor) -> tuple[Tensor, ...]:
        """Every rank's rows of each tensor, concatenated in rank order (the whole batch's, on every rank): one
        all-gather of the parts packed side by side as float64 (exact for indices below 2^53)."""
        if not self.parallel:
            return parts
        widths = [p[0].numel() if p.dim() > 1 else 1 for p in parts]
        packed = torch.cat([p.reshape(p.shape[0], -1).double() for p in parts], dim=1)
        gathered = [torch.empty_like(packed) for _ in range(self.size)]
        dist.all_gather(gathered, packed)
        columns = torch.cat(gathered).split(widths, dim=1)
        return tuple(c.reshape(-1, *p.shape[1:]).to(p.dtype) for c, p in zip(columns, parts, strict=True))

    # ---------------------------------------------------------------------------- agreement
    def objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.parallel:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone (it reads the run folder), its result shared with every rank. A
        user error there is raised by rank 0 and stops the others quietly."""
        if not self.parallel:
            return fn()
        box: list[Any] = [None]
        failure: DiffencError | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except DiffencError as err:
                failure = err
                box[0] = ("error", one_line(err))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "ok":
            return value
        if failure is not None:
            raise failure
        raise PeerStopped(USER_ERROR_EXIT, f"rank 0: {value}")

    def agree(self, failure: DiffencError | None) -> None:
        """Raise on every rank if setting up failed on any: rank 0 with the first failing rank's message,
        the others quietly. In one process: ``failure`` itself."""
        if not self.parallel:
            if failure is not None:
                raise failure
            return
        reports = self.objects(None if failure is None else (type(failure).__name__, str(failure)))
        first = next(((rank, rep) for rank, rep in enumerate(reports) if rep is not None), None)
        if first is None:
            return
        rank, (name, message) = first
        if not self.is_main:
            raise PeerStopped(USER_ERROR_EXIT, f"rank {rank}: {name}: {message}")
        if failure is not None and rank == 0:
            raise failure
        raise (error_class(name) or DiffencError)(f"rank {rank}: {message}")

    def agree_on(self, what: str, value: dict[str, Any], remedy: str) -> None:
        """Every rank must hold the same ``value`` (its configuration, its prepared data): a ConfigError
        naming the first rank and the keys that differ from rank 0's, and the ``remedy``."""
        if not self.parallel:
            return
        values = self.objects(value)
        for rank, other in enumerate(values):
            keys = sorted(k for k in set(values[0]) | set(other) if values[0].get(k) != other.get(k))
            if keys:
                raise self.together(ConfigError(
                    f"rank {rank} has another {what} than rank 0 ({', '.join(keys)} differ): {remedy}"))

    def together(self, err: BaseException) -> BaseException:
        """What to raise where every rank fails the same way: ``err`` on rank 0, a quiet stop elsewhere."""
        return err if self.is_main else PeerStopped(exit_code(err), one_line(err))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        if not self.parallel:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree_step(self, stop: int, elapsed_s: float) -> tuple[int, float]:
        """After a step: the largest stop code of any rank (0: go on), and rank 0's training clock (the time
        budget and the learning-rate schedule read it, so every rank must see the same). One small all-reduce."""
        if not self.parallel:
            return stop, elapsed_s
        t = torch.tensor([float(stop), elapsed_s if self.is_main else 0.0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]), float(t[1])

    def mean_stats(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """A log step's statistics as floats: the mean over ranks (equal shares), ``MAX_STATS`` by their maximum."""
        keys = sorted(stats)
        row = torch.stack([stats[k].detach().double().cpu().reshape(()) for k in keys])
        if self.parallel:
            rows = [torch.empty_like(row) for _ in range(self.size)]
            dist.all_gather(rows, row)
            table = torch.stack(rows)
            row = torch.stack([table[:, j].max() if k in MAX_STATS else table[:, j].mean()
                               for j, k in enumerate(keys)])
        return dict(zip(keys, row.tolist(), strict=True))

    # ------------------------------------------------------------------------------ failure
    def failure(self, err: BaseException) -> BaseException:
        """What this rank raises for ``err`` (an exception no rank agreed on): ``err`` itself when this
        rank is the job's root cause (the first to fail), a quiet :class:`PeerStopped` carrying the root's
        message when another rank failed first, a :class:`JobError` when a peer died without a word."""
        if not self.parallel or isinstance(err, PeerStopped | JobError):
            return err
        root, message = self._root_cause(one_line(err))
        if root != self.rank:
            return PeerStopped(FAILED_EXIT, f"rank {root}: {message}")
        if _collective_failure(err):
            return JobError(f"rank {self.rank}: lost another process of the job (it died, was killed or hung past "
                            f"train.dist_timeout_s): {_backend_reason(err)}")
        return err

    def _root_cause(self, message: str) -> tuple[int, str]:
        """The first rank to record a failure, and its message; this rank when the store is gone."""
        if self.store is None:
            return self.rank, message
        try:
            raw = self.store.compare_set(ROOT_CAUSE_KEY, "", f"{self.rank}\n{message}")
        except Exception:  # the store went with its agent: nobody else can have recorded anything
            return self.rank, message
        rank, _, text = bytes(raw).decode(errors="replace").partition("\n")
        return int(rank), text

    # ---------------------------------------------------------------------------------- DDP
    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when several ranks train (and it has trainable parameters)."""
        params = [p for p in module.parameters() if p.requires_grad]
        if not self.parallel or not params:
            return module
        device_ids = [self.local_rank] if params[0].is_cuda else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True,
                                                   **_no_buffer_sync())


DataParallelMethod.world = World()
_WORLD = World()
_JOINED_RANK: int | None = None  # this process's rank in the job it joined (kept after leaving, for messages)


def current() -> World:
    """The job this process has joined (:func:`join`), or the one-process world."""
    return _WORLD


def launched() -> bool:
    """Whether this process is a rank of a torchrun job (its agent set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_by_diffenc() -> bool:
    """Whether ``diffenc train --nproc`` started this rank (it then reports the job's outcome itself)."""
    return launched() and os.environ.get(LAUNCHED_ENV) == "1"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def join(timeout_s: float, cuda: bool) -> World:
    """Join the torchrun job this process is a rank of (once); the one-process world outside one.

    NCCL for CUDA tensors (with gloo for CPU ones), gloo on CPU; collectives time out after ``timeout_s``.
    """
    global _WORLD, _JOINED_RANK
    if _WORLD.parallel or not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return _WORLD
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank()
    _stop_with_agent()
    timeout = datetime.timedelta(seconds=timeout_s)
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank, world_size=size, timeout=timeout)
    _WORLD = World(rank, size, local, _job_store())
    _JOINED_RANK = rank
    return _WORLD


def leave() -> None:
    """Leave the job (end of training); nothing in one process."""
    global _WORLD
    if _WORLD.parallel:
        with contextlib.suppress(Exception):  # after a peer's failure the group may already be broken
            dist.destroy_process_group()
    _WORLD = World()


def _job_store() -> Any:
    """A client of the job's key-value store (torchrun's agent hosts it), for the root-cause record."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        store = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
    except Exception:  # no reachable store: failures are then reported by every failing rank
        return None
    return dist.PrefixStore(f"diffenc/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}", store)


def _stop_with_agent() -> None:
    """SIGTERM this rank when its agent dies: ranks run in sessions of their own, so a killed agent
    would otherwise leave them training. The signal stops it like any SIGTERM (step, checkpoint)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def should_print(err: BaseException | None = None, agreed: bool = False) -> bool:
    """Whether this process prints ``err``'s line. In one process: yes. In a job started by ``diffenc
    train --nproc``: no, the launcher reports the outcome. Under torchrun: the rank that reports it
    (rank 0 for what every rank ``agreed`` on, such as a stop; else the root cause, the only rank that
    raises anything but :class:`PeerStopped`), and before the job formed, local rank 0 alone (the error
    is then the same on every rank of a machine)."""
    if isinstance(err, PeerStopped):
        return False
    if not launched():
        return True
    if launched_by_diffenc():
        return False
    if _JOINED_RANK is None:
        return local_rank() == 0
    return _JOINED_RANK == 0 or not agreed


def record(err: BaseException) -> None:
    """Write ``err`` into this rank's torchrun error file, where the agent (and ``diffenc train --nproc``)
    reads the failed rank's one-line message."""
    if isinstance(err, PeerStopped) or not os.environ.get(ERROR_FILE_ENV):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    with contextlib.suppress(OSError):
        ErrorHandler().record_exception(_prefixed(err))


def message(err: BaseException) -> str:
    """The line this process prints for ``err`` (``rank k:`` in front on every rank but 0)."""
    return str(_prefixed(err))


def _prefixed(err: BaseException) -> BaseException:
    """``err`` with ``rank k:`` in front of its message (for every rank of a job but 0)."""
    if not _JOINED_RANK or str(err).startswith("rank "):
        return err
    out = type(err).__new__(type(err))
    out.args = (f"rank {_JOINED_RANK}: {err}",)
    return out
