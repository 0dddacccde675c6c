"""The training loop shared by both methods: batches, steps, validation, history, checkpoints, resume.

``train(cfg, start)`` trains ``cfg.train.method`` into ``runs/<name>/`` (status, params, history,
checkpoints); ``start`` says whether it is a new run, resumes one or replaces one
(:mod:`diffenc_core.runstart`). Batches are a function of (seed, step) and the random state is part
of the checkpoint, so a resumed run continues bit-identically on CPU. The fronts (``flows/``) own the
terminal, signals and stop requests: they pass ``on_log`` / ``on_validate`` and ``stop_requested``,
which the loop asks once per step; progress is logged to this module's logger.

In a job of several processes (:mod:`diffenc_core.distributed`) every rank runs ``train`` on its
share of the same global batches; rank 0 alone writes the run. A checkpoint holds every rank's random
stream and every example's chain, so it resumes bit-identically with the same number of processes, and
with another number correctly (the random streams then restart from the seed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from diffenc_core import checkpoint, data, distributed, optim, runs, runstart
from diffenc_core.config import Config, dump
from diffenc_core.em import DiffusionEM
from diffenc_core.errors import CheckpointError, ConfigError, DataError, DiffencError, DivergenceError, RunError
from diffenc_core.interrupt import Interrupted
from diffenc_core.toys import ToyDecoder, toy_from_manifest
from diffenc_core.vae import GaussianVAE

log = logging.getLogger(__name__)
Method = DiffusionEM | GaussianVAE
Callback = Callable[[int, dict[str, float]], None]
StopHook = Callable[[], "int | str | None"]
"""Asked after every step: a signal number (stop, status 'interrupted'), a reason (stop, status
'stopped'), or None (go on)."""
REQUEST = 1  # the stop code of a front's request; a signal's code is its number (>= 2)
VAE_PHASE = "vae_phase.pt"  # a diffusion run's VAE phase, as a VAE checkpoint


class StopTraining(Exception):  # noqa: N818 - a way of ending, like StopIteration
    """The run ended early at its front's request (a pruner, a stop request); ``last.pt`` holds its step."""


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


def build_method(cfg: Config, manifest: dict[str, Any]) -> Method:
    """The model of ``cfg.train.method`` sized for the prepared dataset of ``manifest``."""
    shape = tuple(manifest["image_shape"]) if manifest.get("image_shape") else None
    decoder = known_decoder(cfg, manifest)
    if cfg.train.method == "vae":
        return GaussianVAE(cfg, manifest["x_dim"], shape, decoder)
    return DiffusionEM(cfg, manifest["x_dim"], manifest["sizes"]["train"], shape, decoder)


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
class TrainingSet:
    """The training examples on the training device; ``binary``: every draw is a fresh Bernoulli sample of
    the pixel intensities (``data.binarize: dynamic``, Burda et al. 2015)."""

    x: Tensor
    binary: bool = False

    def __call__(self, idx: Tensor) -> Tensor:
        x = self.x[idx]
        return torch.bernoulli(x) if self.binary else x


@dataclass
class Validation:
    """Cheap held-out numbers tracked during training (and reported to pruners)."""

    x: Tensor

    @torch.no_grad()
    def __call__(self, method: Method) -> dict[str, float]:
        # on a copy of the RNG state: validating never changes what training draws next
        with torch.random.fork_rng(devices=[self.x.device] if self.x.is_cuda else []):
            z, rate = method.encode_with_rate(self.x)
            ll = method.decoder.log_prob(self.x, z)
            mse = (method.decoder.mean(z) - self.x).pow(2).mean(-1)
        return {"val_neg_elbo": (rate - ll).mean().item(), "val_rate": rate.mean().item(),
                "val_distortion": (-ll).mean().item(), "val_mse": mse.mean().item()}


# ----------------------------------------------------------------------------------- the loop
def train(
    cfg: Config,
    start: runstart.Start | runstart.Plan = "new",
    progress: bool = False,
    on_log: Callback | None = None,
    on_validate: Callback | None = None,
    stop_requested: StopHook | None = None,
    val_size: int = 256,
) -> runs.Run:
    """Train ``cfg.train.method`` and return its run; marks the run failed (and re-raises) on error.

    ``start``: ``new`` (refuses a folder that holds a run), ``resume``, ``overwrite``, or a
    :class:`runstart.Plan` made earlier. Nothing of an old run is touched before the data, the device,
    the plan and the model are known to be good. ``progress`` logs a line per log step. In a job every
    rank calls it with the same ``cfg``; rank 0 alone calls ``on_log`` / ``on_validate`` and writes the run.
    """
    world = distributed.current()
    try:
        s = _setup(cfg, start, world, val_size)
        return _loop(cfg, s, world, progress, on_log, on_validate, stop_requested or (lambda: None))
    except (StopTraining, KeyboardInterrupt):
        raise
    except BaseException as err:  # one rank's failure: the job's root cause reports it, the rest stop quietly
        reported = world.failure(err)
        if reported is err:
            raise
        raise reported from None


def _loop(cfg: Config, s: _Start, world: distributed.World, progress: bool, on_log: Callback | None,
          on_validate: Callback | None, stop_requested: StopHook) -> runs.Run:
    """The steps of one run, from ``s.step`` to ``cfg.total_steps`` (or the time budget, or a stop)."""
    method, run, total, tc = s.method, s.run, cfg.total_steps, cfg.train
    ckpt = _Checkpoints(run, cfg, method, world, s.best, s.step, s.phase_start_s)
    step, elapsed, stop, reason = s.step, s.elapsed, 0, ""
    try:
        while step < total and not (tc.time_budget_s and elapsed >= tc.time_budget_s):
            t0 = time.perf_counter()
            idx = world.share(batch_indices(tc.seed, step, s.n_train, tc.batch_size).to(s.device))
            start, end = method.phase_bounds(step, total)
            if step == start:
                ckpt.phase_start_s = elapsed  # the time budget's share of the last phase counts from here
            optim.set_lr(method.optimizers(), optim.lr_scale(cfg, step, elapsed, start, end, ckpt.phase_start_s))
            stats = method.train_step(step, idx, s.examples(idx))
            step += 1
            if step == end < total:  # a diffusion run's VAE phase just ended
                ckpt.save_vae_phase(step, elapsed + time.perf_counter() - t0)
            stop, reason = _stop_code(stop_requested())
            stop, elapsed = world.agree_step(stop, elapsed + time.perf_counter() - t0)
            val_due = step % tc.val_every == 0 or step == total
            val = s.validate(method) if val_due else None  # rank 0's validation (None elsewhere)
            if val_due or step % tc.log_every == 0:
                row = s.history.add(step, step * tc.batch_size / s.n_train, elapsed, world.mean_stats(stats), val)
                if progress and world.is_main:
                    log.info("%s %d/%d  %s", run.name, step, total, _fields(row))
                if on_log is not None and world.is_main:
                    on_log(step, row)
            if val_due:
                _validated(world, on_validate, step, val)  # a pruner's StopTraining, agreed by every rank
            if val_due or step % tc.checkpoint_every == 0:
                ckpt.save(step, elapsed, val)
            if stop:
                break
        if ckpt.saved_step != step:
            ckpt.save(step, elapsed, None if stop else s.validate(method))
        if stop:
            raise _stopped(world, run, step, elapsed, stop, reason)
        _mark(world, run, "done", steps=step, elapsed_s=round(elapsed, 3))
        return run
    except StopTraining as stopped:
        _mark(world, run, "stopped", steps=step, reason=str(stopped))
        raise
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second signal: stopped at once, the last periodic checkpoint kept
        _mark(world, run, "interrupted", steps=step, signal="SIGINT")
        raise
    except BaseException as err:
        reported = world.failure(err)
        _mark(world, run, "failed", steps=step, error=_describe(reported))
        raise


def _stop_code(request: int | str | None) -> tuple[int, str]:
    """A stop request as the number every rank agrees on (its maximum): 0 none, a signal, or REQUEST."""
    if request is None:
        return 0, ""
    return (request, "") if isinstance(request, int) else (REQUEST, request)


def _stopped(world: distributed.World, run: runs.Run, step: int, elapsed: float, code: int,
             reason: str) -> BaseException:
    """What ends a run that stopped on request, after its checkpoint: Interrupted for a signal, else StopTraining."""
    if code == REQUEST:
        # every rank agreed to stop, but the request may have reached another rank than the one that writes the
        # status (a request file that appeared between their checks): the reason any rank read
        reason = next((text for text in world.objects(reason) if text), "stopped on request")
        _mark(world, run, "stopped", steps=step, reason=reason)
        return StopTraining(reason)
    interrupted = Interrupted(code, step, run.path, saved=True)
    _mark(world, run, "interrupted", steps=step, elapsed_s=round(elapsed, 3), signal=interrupted.signal_name)
    return interrupted


def _validated(world: distributed.World, on_validate: Callback | None, step: int,
               val: dict[str, float] | None) -> None:
    """``on_validate`` on rank 0; a StopTraining it raises (a pruner) ends every rank after this step."""
    pruned: str | None = None
    if on_validate is not None and val is not None:
        try:
            on_validate(step, val)
        except StopTraining as stopped:
            if not world.parallel:
                raise
            pruned = str(stopped)
    if world.parallel:
        pruned = world.from_main(lambda: pruned)
        if pruned is not None:
            raise StopTraining(pruned)


def _fields(row: dict[str, Any]) -> str:
    keys = ("epoch", "time_s", "loss_encoder", "loss_vae", "recon_nll", "sync_gap", "accept", "val_neg_elbo")
    return "  ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


# ------------------------------------------------------------------------------- the pieces
@dataclass
class _History:
    """The run's ``history.parquet`` (one row per log step), written by rank 0; non-finite values stop the run."""

    run: runs.Run
    rows: list[dict[str, Any]]
    writes: bool

    def add(self, step: int, epoch: float, elapsed: float, stats: dict[str, float],
            val: dict[str, float] | None) -> dict[str, Any]:
        if not all(math.isfinite(v) for v in stats.values()):
            raise DivergenceError(f"step {step}: non-finite training loss {stats}")
        row = {"step": step, "epoch": epoch, "time_s": elapsed, **stats, **(val or {})}
        self.rows.append(row)
        if self.writes:
            self.run.write_table(runs.HISTORY, pd.DataFrame(self.rows))
        return row


@dataclass
class _Checkpoints:
    """``checkpoints/last.pt`` (every rank's random stream, the models, optimisers and chains) and ``best.pt``
    (the best validation -ELBO in the run's final phase), written atomically by rank 0."""

    run: runs.Run
    cfg: Config
    method: Method
    world: distributed.World
    best: float
    saved_step: int
    phase_start_s: float = 0.0  # training seconds when the current phase began

    def save(self, step: int, elapsed: float, val: dict[str, float] | None) -> None:
        rngs = self.world.objects(checkpoint.rng_state())  # a collective: every rank takes part
        self.saved_step = step
        if not self.world.is_main:
            return
        # best.pt is a model of the run's own method: a diffusion run's VAE phase never is
        final_phase = self.method.phase_bounds(step - 1, self.cfg.total_steps)[1] == self.cfg.total_steps
        improved = val is not None and final_phase and val["val_neg_elbo"] < self.best
        if improved:
            self.best = val["val_neg_elbo"]
        payload = {"method": self.method.name, "step": step, "elapsed_s": elapsed, "best": self.best,
                   "phase_start_s": self.phase_start_s,
                   "rng": rngs[0], "processes": self.world.size, "config": self.cfg.to_dict(), **self.method.state()}
        if self.world.parallel:
            payload["rng_ranks"] = rngs
        checkpoint.save(self.run.checkpoint_dir / "last.pt", payload)
        self.run.set_status("running", checkpoint_step=step)  # how a start learns the step without unpickling
        if improved:
            checkpoint.save(self.run.checkpoint_dir / "best.pt", payload)

    def save_vae_phase(self, step: int, elapsed: float) -> None:
        """``checkpoints/vae_phase.pt``: the VAE a diffusion run's EM phase starts from (its head as the encoder),
        a VAE checkpoint like any other (a ``train.warm_start`` source, what a control starts from)."""
        if not self.world.is_main or not isinstance(self.method, DiffusionEM):
            return
        vae_cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"method": "vae",
                                                                                         "steps": step})})
        checkpoint.save(self.run.checkpoint_dir / VAE_PHASE, {
            "method": "vae", "step": step, "elapsed_s": elapsed, "best": math.inf, "processes": 1,
            "config": vae_cfg.to_dict(), **self.method.vae_phase_state()})


@dataclass
class _Start:
    """Everything a run's loop starts from: its folder, model, data and the resumed counters."""

    run: runs.Run
    method: Method
    examples: TrainingSet
    n_train: int
    device: torch.device
    validate: Callable[[Method], dict[str, float] | None]
    history: _History
    step: int = 0
    elapsed: float = 0.0
    best: float = math.inf
    phase_start_s: float = 0.0


def _setup(cfg: Config, start: runstart.Start | runstart.Plan, world: distributed.World, val_size: int) -> _Start:
    """Plan the start, load the data and the model (resumed or warm-started): user mistakes are agreed by every
    rank before any file of an old run is touched; then open the run folder (rank 0)."""
    world.agree_on("configuration", cfg.to_dict(), "start every process with the same params file and --set values")
    plan = start if isinstance(start, runstart.Plan) else world.from_main(lambda: runstart.plan(cfg, start))
    last = plan.run_dir / runs.CHECKPOINTS / "last.pt"
    # rank 0 reads the files once for every rank: in a job across machines only it sees the run folder
    blob = world.from_main(lambda: checkpoint.read(last)) if plan.resume else None
    warm = None
    if not plan.resume and cfg.train.warm_start is not None and cfg.train.method == "diffusion":
        warm = world.from_main(lambda: _warm_start_source(cfg))
    failure, manifest = None, {}
    step, elapsed, best, phase_start_s, rows = 0, 0.0, math.inf, 0.0, []
    try:
        split = data.load_split(cfg.data.prepared_dir, "train")
        manifest, n_train = split.manifest, len(split)
        _check_recipe(cfg, manifest)
        world.check_batch(cfg.train.batch_size, n_train)
        val_x = data.load_split(cfg.data.prepared_dir, "val").x[:val_size].clone() if world.is_main else None
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        device = device_for(cfg, world.local_rank if world.parallel else None)
        torch.manual_seed(cfg.train.seed)  # the same initial model on every rank
        method = build_method(cfg, manifest).to(device)
        if blob is not None:
            step, elapsed, best, phase_start_s = _resume(method, blob, last, cfg, world)
            rows = _old_history(plan.run_dir, step) if world.is_main else []
        else:
            if warm is not None and isinstance(method, DiffusionEM):
                _warm_start(method, warm, device)
            if world.parallel:  # one random stream per rank (the model above is the same everywhere)
                torch.manual_seed(distributed.rank_seed(cfg.train.seed, 0, world.rank))
    except DiffencError as err:
        failure = err
    world.agree(failure)
    world.agree_on(f"prepared data in {cfg.data.prepared_dir}", manifest.get("sha256") or {},
                   "run `diffenc prepare` with the same params on every machine")
    examples = TrainingSet(split.x.to(device), binary=manifest.get("binarize") == "dynamic")
    if isinstance(method, DiffusionEM):
        method.attach_data(examples)  # chain replay draws encoder pairs from every example
    method.distribute(world)
    run = runstart.begin(plan) if world.is_main else runs.Run(plan.run_dir)
    if world.is_main:
        dump(cfg, run.file(runs.PARAMS))
        run.set_status("running", seed=cfg.train.seed, method=method.name, resumed_from=step or None,
                       processes=world.size)
    validate = Validation(val_x.to(device)) if val_x is not None else (lambda _method: None)
    return _Start(run, method, examples, n_train, device, validate, _History(run, rows, world.is_main),
                  step, elapsed, best, phase_start_s)


def _check_recipe(cfg: Config, manifest: dict[str, Any]) -> None:
    """The prepared data must be what ``cfg.data`` describes (e.g. not intensities for a binarised run)."""
    stored, wanted = manifest.get("recipe"), data.recipe(cfg.data)
    if stored is None:  # prepared before recipes were recorded
        return
    keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if keys:
        raise DataError(f"{cfg.data.prepared_dir}: prepared with other data settings ("
                        f"{', '.join('data.' + k for k in keys)} differ): run `diffenc prepare` with these settings")


def _resume(method: Method, blob: bytes, last: Path, cfg: Config,
            world: distributed.World) -> tuple[int, float, float, float]:
    """Load ``last.pt`` into ``method`` and the random streams; its step, training seconds, best -ELBO and the
    training seconds at which its phase began."""
    state = checkpoint.loads(blob, last, map_location=next(method.parameters()).device)
    if state.get("method") != method.name:
        raise CheckpointError(f"{last}: holds a '{state.get('method')}' run, not '{method.name}'")
    try:
        method.load_state(state)
    except (RuntimeError, KeyError, ValueError) as err:
        detail = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{last}: does not fit this configuration ({detail})") from None
    step = int(state["step"])
    if int(state.get("processes", 1)) == world.size:
        checkpoint.set_rng_state(state["rng_ranks"][world.rank] if world.parallel else state["rng"])
    else:  # another number of processes (a documented change): fresh streams from (train.seed, step, rank)
        torch.manual_seed(distributed.rank_seed(cfg.train.seed, step, world.rank))
    return step, float(state["elapsed_s"]), float(state["best"]), float(state.get("phase_start_s", 0.0))


def _old_history(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """The history rows of a resumed run up to its checkpoint; an unreadable file stops the resume (its rows
    would be lost)."""
    run = runs.Run(run_dir)
    old = run.history()
    if old is None and run.file(runs.HISTORY).exists():
        raise RunError(f"{run.file(runs.HISTORY)}: unreadable ({'; '.join(run.problems)}): resuming would lose its "
                       "rows; move it aside to resume without them, or replace the run with --overwrite")
    return [] if old is None else old[old["step"] <= step].to_dict("records")


def _warm_start_source(cfg: Config) -> tuple[Path, bytes]:
    """The checkpoint of the VAE run ``train.warm_start`` and its bytes: its best (early-stopped on
    held-out data), else its last."""
    assert cfg.train.warm_start is not None
    source = runstart.run_path(cfg.train.runs_dir, cfg.train.warm_start, "train.warm_start")
    ckpt = source / runs.CHECKPOINTS
    path = ckpt / "best.pt" if (ckpt / "best.pt").exists() else ckpt / "last.pt"
    if not path.exists():
        raise RunError(f"train.warm_start: {source} has no checkpoint — train that VAE run first "
                       f"(diffenc train --set train.method=vae --set train.run={cfg.train.warm_start})")
    return path, checkpoint.read(path)


def _warm_start(method: DiffusionEM, source: tuple[Path, bytes], device: torch.device) -> None:
    """Seed the diffusion run's decoder and Gaussian head from the VAE run ``train.warm_start``; the VAE must
    have the same data, latent size, decoder and encoder shapes."""
    path, blob = source
    state = checkpoint.loads(blob, path, map_location=device)
    if state.get("method") != "vae":
        raise ConfigError(f"train.warm_start: {path.parent.parent} is a '{state.get('method')}' run, not a VAE run")
    models = state["models"]
    decoder = {k.removeprefix("decoder."): v for k, v in models.items() if k.startswith("decoder.")}
    head = {k.removeprefix("encoder."): v for k, v in models.items() if k.startswith("encoder.")}
    try:
        method.warm_start(decoder, head)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise ConfigError(f"train.warm_start: {path} does not fit this model "
                          f"(latent size, data or network shapes differ: {detail})") from None


def _describe(err: BaseException) -> str:
    """What a failed run's status records: the root cause's message when another rank failed first."""
    if isinstance(err, distributed.PeerStopped):
        return err.reason
    return f"{err.__class__.__name__}: {err}"


def _mark(world: distributed.World, run: runs.Run, state: str, **extra: Any) -> None:
    """Record how a run ended (rank 0). On a full disk the atomic write has no room for its temporary file:
    the status is then rewritten in place, so it never stays 'running'."""
    if not world.is_main:
        return
    try:
        run.set_status(state, **extra)
    except (OSError, DiffencError):
        with contextlib.suppress(OSError, ValueError):
            status = {**run.status(), **extra, "state": state, "finished": runs.now()}
            _overwrite_in_place(run.file(runs.STATUS), json.dumps(status, default=str).encode())


def _overwrite_in_place(path: Path, body: bytes) -> None:
    """Replace ``path``'s bytes without a temporary file (reuses its own blocks on a full disk)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, body)
        os.ftruncate(fd, len(body))
    finally:
        os.close(fd)
