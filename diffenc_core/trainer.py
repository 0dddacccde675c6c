"""The training loop shared by both methods: data, run directory, progress, checkpoints, resume.

``train(cfg)`` writes ``runs/<name>/`` (status, params, history, checkpoints); ``start`` says
whether it is a new run, resumes one or replaces one (:mod:`diffenc_core.runstart`). A resumed run
continues from ``checkpoints/last.pt`` bit-identically on CPU: batches are a function of (seed,
step), and the RNG state is part of the checkpoint. With ``stop_signals`` a SIGTERM/SIGINT ends
the run after its current step with a checkpoint and the status ``interrupted``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from diffenc_core import checkpoint, data, runs, runstart
from diffenc_core.config import Config, dump
from diffenc_core.em import DiffusionEM
from diffenc_core.errors import CheckpointError, ConfigError, DiffencError, DivergenceError, RunError
from diffenc_core.interrupt import Interrupted, StopRequest
from diffenc_core.toys import ToyDecoder, toy_from_manifest
from diffenc_core.vae import GaussianVAE

Callback = Callable[[int, dict[str, float]], None]


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a validation callback (e.g. a tuning pruner) to end a run early."""


def device_for(cfg: Config) -> torch.device:
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(cfg.train.device)


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


def build_method(cfg: Config, manifest: dict[str, Any]) -> DiffusionEM | GaussianVAE:
    """The model of ``cfg.train.method`` sized for the prepared dataset of ``manifest``."""
    shape = tuple(manifest["image_shape"]) if manifest.get("image_shape") else None
    decoder = known_decoder(cfg, manifest)
    if cfg.train.method == "vae":
        return GaussianVAE(cfg, manifest["x_dim"], shape, decoder)
    return DiffusionEM(cfg, manifest["x_dim"], manifest["sizes"]["train"], shape, decoder)


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
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    b = min(batch_size, n)
    return perm[pos * b : (pos + 1) * b]


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


def _warm_start(method: DiffusionEM, cfg: Config, device: torch.device) -> None:
    """Seed the diffusion run's decoder and Gaussian head from the VAE run ``train.warm_start``.

    Takes its best checkpoint (early-stopped on held-out data), else its last; the VAE must have
    the same data, latent size, decoder and encoder shapes.
    """
    source = Path(cfg.train.runs_dir) / cfg.train.warm_start
    ckpt = source / runs.CHECKPOINTS
    path = ckpt / "best.pt" if (ckpt / "best.pt").exists() else ckpt / "last.pt"
    if not path.exists():
        raise RunError(f"train.warm_start: {source} has no checkpoint — train that VAE run first "
                       f"(diffenc train --set train.method=vae --set train.run={cfg.train.warm_start})")
    state = checkpoint.load(path, map_location=device)
    if state.get("method") != "vae":
        raise ConfigError(f"train.warm_start: {source} is a '{state.get('method')}' run, not a VAE run")
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
    device, the plan and the model are known to be good.
    """
    train_split = data.load_split(cfg.data.prepared_dir, "train")
    val_split = data.load_split(cfg.data.prepared_dir, "val")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = device_for(cfg)
    plan = start if isinstance(start, runstart.Plan) else runstart.plan(cfg, start)
    last = plan.run_dir / runs.CHECKPOINTS / "last.pt"
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, train_split.manifest).to(device)
    history: list[dict[str, Any]] = []
    start, elapsed, best = 0, 0.0, math.inf
    saved_step = -1
    if plan.resume:
        state = checkpoint.load(last, map_location=device)
        if state.get("method") != method.name:
            raise CheckpointError(f"{last}: holds a '{state.get('method')}' run, not '{method.name}'")
        try:
            method.load_state(state)
        except (RuntimeError, KeyError, ValueError) as err:
            detail = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{last}: does not fit this configuration ({detail})") from None
        checkpoint.set_rng_state(state["rng"])
        start, elapsed, best = int(state["step"]), float(state["elapsed_s"]), float(state["best"])
        saved_step = start
        old = runs.Run(plan.run_dir).history()
        if old is not None:
            history = old[old["step"] <= start].to_dict("records")
    else:
        if cfg.train.warm_start is not None and isinstance(method, DiffusionEM):
            _warm_start(method, cfg, device)
    run = runstart.begin(plan)
    dump(cfg, run.file(runs.PARAMS))
    run.set_status("running", seed=cfg.train.seed, method=method.name, resumed_from=start or None)
    x_train = train_split.x.to(device)
    if isinstance(method, DiffusionEM):
        method.attach_data(x_train)  # chain replay draws encoder pairs from every example
    validate = Validation(val_split.x[:val_size].to(device))

    def save(step: int, val: dict[str, float] | None) -> None:
        nonlocal best, saved_step
        saved_step = step
        payload = {
            "method": method.name,
            "step": step,
            "elapsed_s": elapsed,
            "best": best,
            "rng": checkpoint.rng_state(),
            "config": cfg.to_dict(),
            **method.state(),
        }
        checkpoint.save(last, payload)
        # best.pt is a model of the run's own method: a diffusion run's VAE phase never is
        final_phase = method.phase_bounds(step - 1, total)[1] == total
        if val is not None and final_phase and val["val_neg_elbo"] < best:
            best = val["val_neg_elbo"]
            payload["best"] = best
            checkpoint.save(run.checkpoint_dir / "best.pt", payload)

    total = cfg.total_steps
    bar = _Progress(progress, total, start, run.name)
    step = start
    stop = StopRequest(stop_signals)
    try:
        while step < total:
            if stop or (cfg.train.time_budget_s and elapsed >= cfg.train.time_budget_s):
                break
            t0 = time.perf_counter()
            idx = batch_indices(cfg.train.seed, step, len(train_split), cfg.train.batch_size).to(device)
            set_lr(method.optimizers(), lr_scale(cfg, step, elapsed, *method.phase_bounds(step, total)))
            stats = method.train_step(step, idx, x_train[idx])
            elapsed += time.perf_counter() - t0
            step += 1
            if not all(math.isfinite(v) for v in stats.values()):
                raise DivergenceError(f"step {step}: non-finite training loss {stats}")
            val = None
            if step % cfg.train.val_every == 0 or step == total:
                val = validate(method)
            if step % cfg.train.log_every == 0 or val is not None:
                row = {"step": step, "epoch": step * cfg.train.batch_size / len(train_split),
                       "time_s": elapsed, **stats, **(val or {})}
                history.append(row)
                run.write_table(runs.HISTORY, pd.DataFrame(history))
                if on_log:
                    on_log(step, row)
                bar.update(step, row)
            if val is not None and on_validate:
                on_validate(step, val)
            if step % cfg.train.checkpoint_every == 0 or val is not None:
                save(step, val)
        if stop.signum is not None:
            saved = step > 0
            if saved and saved_step != step:
                save(step, None)
            interrupted = Interrupted(stop.signum, step, run.path, saved)
            run.set_status("interrupted", steps=step, elapsed_s=round(elapsed, 3), signal=interrupted.signal_name)
            raise interrupted
        if saved_step != step:
            save(step, validate(method))
        run.set_status("done", steps=step, elapsed_s=round(elapsed, 3))
    except StopTraining as stopped:
        _mark(run, "stopped", steps=step, reason=str(stopped))
        raise
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second signal, or Ctrl-C without stop_signals: no checkpoint of this step
        _mark(run, "interrupted", steps=step, signal="SIGINT")
        raise
    except BaseException as err:
        _mark(run, "failed", steps=step, error=f"{err.__class__.__name__}: {err}")
        raise
    finally:
        stop.uninstall()
        bar.close()
    return run


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
