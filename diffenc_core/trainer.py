"""The training loop shared by both methods: data, run directory, progress, checkpoints, resume.

``train(cfg)`` writes ``runs/<name>/`` (status, params, history, checkpoints); ``start`` says
whether it is a new run, resumes one or replaces one (:mod:`diffenc_core.runstart`). A resumed run
continues from ``checkpoints/last.pt`` bit-identically on CPU: batches are a function of (seed,
step), and the RNG state is part of the checkpoint. With ``stop_signals`` a SIGTERM/SIGINT ends
the run after its current step with a checkpoint and the status ``interrupted``.

In a job of several processes (:mod:`diffenc_core.distributed`) every rank runs ``train``: the same
global batches, each rank training on its own examples' share of them; rank 0 alone writes the run.
A checkpoint holds every rank's random stream and the per-example state of all examples, so it
resumes bit-identically with the same number of processes, and with another number correctly (the
model, optimisers, chains and step sizes carry over; the random streams restart from the seed).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from diffenc_core import checkpoint, data, distributed, runs, runstart
from diffenc_core.config import Config, dump
from diffenc_core.em import DiffusionEM
from diffenc_core.errors import CheckpointError, ConfigError, DiffencError, DivergenceError, RunError
from diffenc_core.interrupt import Interrupted, StopRequest
from diffenc_core.toys import ToyDecoder, toy_from_manifest
from diffenc_core.vae import GaussianVAE

Callback = Callable[[int, dict[str, float]], None]


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a validation callback (e.g. a tuning pruner) to end a run early."""


def device_for(cfg: Config, local_rank: int | None = None) -> torch.device:
    """The training device; with ``local_rank`` (a rank of a job) that rank's own GPU."""
    if cfg.train.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    else:
        kind = cfg.train.device
    return torch.device(kind, local_rank) if kind == "cuda" and local_rank is not None else torch.device(kind)


def known_decoder(cfg: Config, manifest: dict[str, Any]) -> ToyDecoder | None:
    """The dataset's own decoder when ``model.decoder.kind`` is ``truth``."""
    if cfg.model.decoder.kind != "truth":
        return None
    truth = toy_from_manifest(manifest)
    if truth is None:
        raise ConfigError(
            "model.decoder.kind: 'truth' needs a dataset with a known decoder "
            f"(bimodal or linear_gaussian), not '{manifest.get('dataset')}'"
        )
    if cfg.model.latent_dim != truth.z_dim:
        raise ConfigError(f"model.latent_dim: the known decoder has {truth.z_dim} latents, not {cfg.model.latent_dim}")
    return ToyDecoder(truth)


def build_method(cfg: Config, manifest: dict[str, Any], n_train: int | None = None) -> DiffusionEM | GaussianVAE:
    """The model of ``cfg.train.method`` sized for the prepared dataset of ``manifest``, with E-step
    state for ``n_train`` examples (default: the whole training split; a rank of a job: its own)."""
    shape = tuple(manifest["image_shape"]) if manifest.get("image_shape") else None
    decoder = known_decoder(cfg, manifest)
    if cfg.train.method == "vae":
        return GaussianVAE(cfg, manifest["x_dim"], shape, decoder)
    n = manifest["sizes"]["train"] if n_train is None else n_train
    return DiffusionEM(cfg, manifest["x_dim"], n, shape, decoder)


def lr_scale(cfg: Config, step: int, elapsed_s: float = 0.0, start: int = 0, end: int | None = None) -> float:
    """Learning-rate multiplier: cosine from 1 to ``lr_final_ratio`` over ``[start, end)``, or constant.

    ``[start, end)`` is the phase ``step`` is in (a diffusion run restarts the schedule when its
    VAE phase ends); ``end`` defaults to the run's last step. The last phase also ends early when
    the time budget does. Without a time budget it is a pure function of the step, so a resumed
    run gets exactly the same rates.
    """
    if cfg.train.lr_schedule == "constant":
        return 1.0
    total = cfg.total_steps
    end = total if end is None else end
    progress = (step - start) / max(1, end - start)
    if cfg.train.time_budget_s and end == total:
        progress = max(progress, elapsed_s / cfg.train.time_budget_s)
    progress = min(progress, 1.0)
    floor = cfg.train.lr_final_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], scale: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * scale


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> Tensor:
    """The mini-batch of ``step``: a slice of the seeded permutation of its epoch."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, pos = divmod(step, per_epoch)
    b = min(batch_size, n)
    return _epoch_permutation(seed, epoch, n)[pos * b : (pos + 1) * b].clone()


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    """Drawn once per epoch, not per step: a step's cost must not grow with the dataset."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class Validation:
    """Cheap held-out numbers tracked during training (and reported to pruners)."""

    x: Tensor

    @torch.no_grad()
    def __call__(self, method: DiffusionEM | GaussianVAE) -> dict[str, float]:
        # on a copy of the RNG state: validating never changes what training draws next
        with torch.random.fork_rng(devices=[self.x.device] if self.x.is_cuda else []):
            return self._measure(method)

    def _measure(self, method: DiffusionEM | GaussianVAE) -> dict[str, float]:
        z, rate = method.encode_with_rate(self.x)
        ll = method.decoder.log_prob(self.x, z)
        mse = (method.decoder.mean(z) - self.x).pow(2).mean(-1)
        return {
            "val_neg_elbo": (rate - ll).mean().item(),
            "val_rate": rate.mean().item(),
            "val_distortion": (-ll).mean().item(),
            "val_mse": mse.mean().item(),
        }


def _warm_start_source(cfg: Config) -> tuple[Path, bytes]:
    """The checkpoint of the VAE run ``train.warm_start`` and its bytes: its best (early-stopped on
    held-out data), else its last."""
    assert cfg.train.warm_start is not None
    source = Path(cfg.train.runs_dir) / cfg.train.warm_start
    ckpt = source / runs.CHECKPOINTS
    path = ckpt / "best.pt" if (ckpt / "best.pt").exists() else ckpt / "last.pt"
    if not path.exists():
        raise RunError(f"train.warm_start: {source} has no checkpoint — train that VAE run first "
                       f"(diffenc train --set train.method=vae --set train.run={cfg.train.warm_start})")
    return path, checkpoint.read(path)


def _warm_start(method: DiffusionEM, cfg: Config, source: tuple[Path, bytes], device: torch.device) -> None:
    """Seed the diffusion run's decoder and Gaussian head from the VAE run ``train.warm_start``
    (:func:`_warm_start_source`); the VAE must have the same data, latent size, decoder and encoder shapes.
    """
    path, blob = source
    source_dir = path.parent.parent
    state = checkpoint.loads(blob, path, map_location=device)
    if state.get("method") != "vae":
        raise ConfigError(f"train.warm_start: {source_dir} is a '{state.get('method')}' run, not a VAE run")
    models = state["models"]
    decoder = {k.removeprefix("decoder."): v for k, v in models.items() if k.startswith("decoder.")}
    head = {k.removeprefix("encoder."): v for k, v in models.items() if k.startswith("encoder.")}
    try:
        method.warm_start(decoder, head)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(f"train.warm_start: {path} does not fit this model "
                          f"(latent size, data or network shapes differ: {detail})") from None


def train(
    cfg: Config,
    start: runstart.Start | runstart.Plan = "new",
    progress: bool = True,
    on_log: Callback | None = None,
    on_validate: Callback | None = None,
    val_size: int = 256,
    stop_signals: bool = False,
) -> runs.Run:
    """Train ``cfg.train.method`` and return its run; marks the run failed (and re-raises) on error.

    ``start``: ``new`` (refuses a folder that holds a run), ``resume``, ``overwrite``, or a
    :class:`runstart.Plan` made earlier. Nothing of an old run is touched before the data, the
    device, the plan and the model are known to be good. In a job every rank calls it (the same
    ``cfg``); rank 0 alone plans, validates, logs, calls ``on_log``/``on_validate`` and writes the run.
    """
    world = distributed.current()
    try:
        return _train(cfg, start, progress, on_log, on_validate, val_size, stop_signals, world)
    except (StopTraining, KeyboardInterrupt):
        raise
    except BaseException as err:  # one rank's failure: the job's root cause reports it, the rest stop quietly
        reported = world.failure(err)
        if reported is err:
            raise
        raise reported from None


def _train(
    cfg: Config,
    start: runstart.Start | runstart.Plan,
    progress: bool,
    on_log: Callback | None,
    on_validate: Callback | None,
    val_size: int,
    stop_signals: bool,
    world: distributed.World,
) -> runs.Run:
    world.agree_on("configuration", cfg.to_dict(), "start every process with the same params file and --set values")
    plan = start if isinstance(start, runstart.Plan) else world.from_main(lambda: runstart.plan(cfg, start))
    last = plan.run_dir / runs.CHECKPOINTS / "last.pt"
    # rank 0 reads the files once for every rank: in a job across machines only it sees the run folder
    blob = world.from_main(lambda: checkpoint.read(last)) if plan.resume else None
    warm = None
    if not plan.resume and cfg.train.warm_start is not None and cfg.train.method == "diffusion":
        warm = world.from_main(lambda: _warm_start_source(cfg))
    history: list[dict[str, Any]] = []
    start, elapsed, best = 0, 0.0, math.inf
    saved_step = -1
    failure: DiffencError | None = None
    try:
        # this rank's examples alone: i, i + size, ... (all of them in one process)
        train_split = data.load_split(cfg.data.prepared_dir, "train", (world.rank, world.size))
        val_x = data.load_split(cfg.data.prepared_dir, "val").x[:val_size].clone() if world.is_main else None
        x_train, manifest = train_split.x, train_split.manifest
        n_train = int(manifest["sizes"]["train"])
        del train_split
        if n_train < world.size:
            raise ConfigError(f"train.nproc: {world.size} processes need at least as many training examples; "
                              f"{cfg.data.prepared_dir} has {n_train}")
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        device = device_for(cfg, world.local_rank if world.parallel else None)
        torch.manual_seed(cfg.train.seed)  # the same initial model on every rank
        method = build_method(cfg, manifest, world.owned(n_train)).to(device)
        if plan.resume:
            assert blob is not None
            state = checkpoint.loads(blob, last, map_location=device)
            if state.get("method") != method.name:
                raise CheckpointError(f"{last}: holds a '{state.get('method')}' run, not '{method.name}'")
            try:
                method.load_state(_per_example(state, method, world, world.rows))
            except (RuntimeError, KeyError, ValueError) as err:
                detail = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
                raise CheckpointError(f"{last}: does not fit this configuration ({detail})") from None
            start, elapsed, best = int(state["step"]), float(state["elapsed_s"]), float(state["best"])
            _restore_rng(state, cfg, world, start)
            saved_step = start
            old = runs.Run(plan.run_dir).history() if world.is_main else None
            if old is not None:
                history = old[old["step"] <= start].to_dict("records")
        else:
            if warm is not None and isinstance(method, DiffusionEM):
                _warm_start(method, cfg, warm, device)
            if world.parallel:  # one random stream per rank (the model above is the same everywhere)
                torch.manual_seed(distributed.rank_seed(cfg.train.seed, 0, world.rank))
    except DiffencError as err:
        failure = err
    world.agree(failure)
    world.agree_on(f"prepared data in {cfg.data.prepared_dir}", manifest.get("sha256") or {},
                   "run `diffenc prepare` with the same params on every machine")
    x_train = x_train.to(device)
    if isinstance(method, DiffusionEM):
        method.attach_data(x_train)  # chain replay draws encoder pairs from every example (of this rank)
    method.distribute(world.wrap)
    run = runstart.begin(plan) if world.is_main else runs.Run(plan.run_dir)
    if world.is_main:
        dump(cfg, run.file(runs.PARAMS))
        run.set_status("running", seed=cfg.train.seed, method=method.name, resumed_from=start or None,
                       processes=world.size)
    validate = Validation(val_x.to(device)) if val_x is not None else None

    def mark(state: str, **extra: Any) -> None:
        if world.is_main:
            _mark(run, state, **extra)

    def save(step: int, val: dict[str, float] | None) -> None:
        nonlocal best, saved_step
        saved_step = step
        state = _per_example(method.state(), method, world, functools.partial(world.gather_rows, n=n_train))
        rngs = world.objects(checkpoint.rng_state())
        if not world.is_main:
            return
        payload = {
            "method": method.name,
            "step": step,
            "elapsed_s": elapsed,
            "best": best,
            "rng": rngs[0],
            "processes": world.size,
            "config": cfg.to_dict(),
            **state,
        }
        if world.parallel:
            payload["rng_ranks"] = rngs
        checkpoint.save(last, payload)
        # best.pt is a model of the run's own method: a diffusion run's VAE phase never is
        final_phase = method.phase_bounds(step - 1, total)[1] == total
        if val is not None and final_phase and val["val_neg_elbo"] < best:
            best = val["val_neg_elbo"]
            payload["best"] = best
            checkpoint.save(run.checkpoint_dir / "best.pt", payload)

    total = cfg.total_steps
    bar = _Progress(progress and world.is_main, total, start, run.name)
    step = start
    stop = StopRequest(stop_signals)
    signum, requested = 0, False  # in a job: a signal any rank got, a stop file rank 0 found (agreed per step)
    stop_file = run.file(runs.STOP_REQUEST)
    if world.parallel and world.is_main:
        stop_file.unlink(missing_ok=True)  # a request its launcher left behind belongs to no run of today
    pruned: str | None = None
    try:
        while step < total:
            halted = bool(signum or requested) if world.parallel else bool(stop)
            if halted or (cfg.train.time_budget_s and elapsed >= cfg.train.time_budget_s):
                break
            t0 = time.perf_counter()
            idx = batch_indices(cfg.train.seed, step, n_train, cfg.train.batch_size).to(device)
            set_lr(method.optimizers(), lr_scale(cfg, step, elapsed, *method.phase_bounds(step, total)))
            stats, n_local = _step(method, world, step, idx, x_train)
            seconds = time.perf_counter() - t0
            request = world.parallel and world.is_main and stop_file.is_file()
            stats, seconds, signum, requested = world.sync_step(stats, n_local, idx.numel(), seconds,
                                                                stop.signum or 0, request)
            elapsed += seconds
            step += 1
            if not all(math.isfinite(v) for v in stats.values()):
                raise world.together(DivergenceError(f"step {step}: non-finite training loss {stats}"))
            val_due = step % cfg.train.val_every == 0 or step == total
            val = validate(method) if val_due and validate is not None else None
            if val_due or step % cfg.train.log_every == 0:
                if world.is_main:
                    row = {"step": step, "epoch": step * cfg.train.batch_size / n_train,
                           "time_s": elapsed, **stats, **(val or {})}
                    history.append(row)
                    run.write_table(runs.HISTORY, pd.DataFrame(history))
                    if on_log:
                        on_log(step, row)
                    bar.update(step, row)
            if val is not None and on_validate:
                try:
                    on_validate(step, val)
                except StopTraining as stopped:
                    if not world.parallel:
                        raise
                    pruned = str(stopped)
            if val_due and world.parallel:  # a pruner's stop, agreed before anyone checkpoints this step
                reason = world.from_main(lambda pruned=pruned: pruned)
                if reason is not None:
                    raise StopTraining(reason)
            if step % cfg.train.checkpoint_every == 0 or val_due:
                save(step, val)
        sig = signum if world.parallel else (stop.signum or 0)
        if sig:
            saved = step > 0
            if saved and saved_step != step:
                save(step, None)
            interrupted = Interrupted(sig, step, run.path, saved)
            if world.is_main:
                run.set_status("interrupted", steps=step, elapsed_s=round(elapsed, 3),
                               signal=interrupted.signal_name)
            raise interrupted
        if requested:  # the launcher asked (a callback of its caller stopped the run)
            if saved_step != step:
                save(step, None)
            raise StopTraining(_take_stop_request(stop_file) if world.is_main else "stopped on request")
        if saved_step != step:
            save(step, validate(method) if validate is not None else None)
        if world.is_main:
            run.set_status("done", steps=step, elapsed_s=round(elapsed, 3))
    except StopTraining as stopped:
        mark("stopped", steps=step, reason=str(stopped))
        raise
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second signal, or Ctrl-C without stop_signals: no checkpoint of this step
        mark("interrupted", steps=step, signal="SIGINT")
        raise
    except BaseException as err:
        reported = world.failure(err)
        mark("failed", steps=step, error=_describe(reported))
        if reported is err:
            raise
        raise reported from None
    finally:
        stop.uninstall()
        bar.close()
    return run


def _step(method: DiffusionEM | GaussianVAE, world: distributed.World, step: int, idx: Tensor,
          x_own: Tensor) -> tuple[dict[str, float], int]:
    """One training step on this rank's share of the global batch ``idx``: its statistics and examples."""
    rows = world.shard(idx)
    method.loss_scale = world.loss_scale(rows.numel(), idx.numel())
    if rows.numel() > 0:
        return method.train_step(step, rows, x_own[rows]), rows.numel()
    # none of this batch is ours: a zero-weight step on one of our examples (its state kept as it was)
    # keeps this rank's collectives in step with the others'
    rows = idx.new_zeros(1)
    buffers = {name: getattr(method, name) for name in getattr(method, "PER_EXAMPLE", ())}
    with distributed.untouched(buffers, rows):
        return method.train_step(step, rows, x_own[rows]), 0


def _per_example(state: dict[str, Any], method: DiffusionEM | GaussianVAE, world: distributed.World,
                 fn: Callable[[Tensor], Tensor | None]) -> dict[str, Any]:
    """``state`` with ``fn`` applied to each per-example buffer (the E-step chains and step sizes):
    cut to this rank's rows on load, gathered in example order for a checkpoint."""
    names = getattr(method, "PER_EXAMPLE", ())
    if not world.parallel or not names:
        return state
    models = dict(state["models"])
    for name in names:
        models[name] = fn(models[name])
    return {**state, "models": models}


def _restore_rng(state: dict[str, Any], cfg: Config, world: distributed.World, step: int) -> None:
    """The random streams of the checkpoint's ranks; with another number of processes (a documented
    change) fresh ones seeded from ``(train.seed, step, rank)``."""
    if int(state.get("processes", 1)) == world.size:
        checkpoint.set_rng_state(state["rng_ranks"][world.rank] if world.parallel else state["rng"])
    else:
        torch.manual_seed(distributed.rank_seed(cfg.train.seed, step, world.rank))


def _take_stop_request(path: Path) -> str:
    """The reason a stop request file gives (it is removed: the request is served)."""
    with contextlib.suppress(OSError):
        reason = path.read_text().strip()
        path.unlink()
        return reason or "stopped on request"
    return "stopped on request"


def _describe(err: BaseException) -> str:
    """What a failed run's status records: the root cause's message when another rank failed first."""
    if isinstance(err, distributed.PeerStopped):
        return err.reason
    return f"{err.__class__.__name__}: {err}"

def _mark(run: runs.Run, state: str, **extra: Any) -> None:
    """Record how a run ended, best effort: on a full or read-only disk the original error is the news."""
    with contextlib.suppress(OSError, DiffencError):
        run.set_status(state, **extra)


PIPE_COLUMNS = 400
"""Progress line width when stdout is not a terminal (a log file, CI, DVC) and ``COLUMNS`` is unset:
rich would assume 80 columns and cut the loss and acceptance fields off."""


def _console() -> Any:
    import os
    import sys

    from rich.console import Console

    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(width=PIPE_COLUMNS if wide else None)


class _Progress:
    """A rich progress bar with the loss, sync gap and acceptance (silent when disabled)."""

    FIELDS = ("epoch", "loss_encoder", "loss_vae", "recon_nll", "sync_gap", "accept", "val_neg_elbo")

    def __init__(self, enabled: bool, total: int, start: int, name: str):
        self.prog = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.prog = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=_console(),
            )
            self.prog.start()
            self.task = self.prog.add_task(name, total=total, completed=start, info="")

    def update(self, step: int, row: dict[str, Any]) -> None:
        if self.prog is None:
            return
        info = "  ".join(f"{k}={row[k]:.3g}" for k in self.FIELDS if k in row)
        self.prog.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()
