"""Evaluate a trained run (docs/method.md §8) and write its metrics, tables and plots.

Reads ``checkpoints/best.pt`` (or ``last.pt``: ``eval.checkpoint``) and the test split; writes
``metrics.json``, ``recon.parquet``,
``latents.parquet``, ``posterior.parquet`` (samples for the toys with a known posterior, else empty) and
``plots/*.png``. The model configuration comes from the checkpoint; ``eval`` from the caller.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from diffenc_core import checkpoint, data, metrics, plots, runs
from diffenc_core.config import Config, from_dict
from diffenc_core.em import DiffusionEM
from diffenc_core.errors import CheckpointError, RunError
from diffenc_core.evidence import AISSettings, ais_log_px
from diffenc_core.langevin import e_step
from diffenc_core.toys import Bimodal, LinearGaussian, std_normal_log_prob, toy_from_manifest
from diffenc_core.trainer import build_method, device_for
from diffenc_core.vae import GaussianVAE, gaussian_log_q

Method = DiffusionEM | GaussianVAE
POSTERIOR_COLUMNS = {"x_index": "int64", "source": "str", "z0": "float32", "z1": "float32"}


def load_method(run: runs.Run, eval_cfg: Config | None = None) -> tuple[Method, Config]:
    """Rebuild a run's model from its checkpoint (its own config, the caller's eval section).

    ``eval.checkpoint: best`` takes the checkpoint with the best validation -ELBO (early
    stopping on held-out data), ``last`` the final one.
    """
    name = eval_cfg.eval.checkpoint if eval_cfg is not None else "best"
    path = run.checkpoint_dir / f"{name}.pt"
    if not path.exists():  # a run too short to validate has only last.pt
        path = run.checkpoint_dir / "last.pt"
    state = checkpoint.load(path)
    cfg = from_dict(state["config"], f"{path}[config]")
    if eval_cfg is not None:
        cfg = cfg.model_copy(update={"eval": eval_cfg.eval})
    manifest = data.read_manifest(cfg.data.prepared_dir)
    method = build_method(cfg, manifest)
    if method.name != state["method"]:
        raise RunError(f"{run.path}: checkpoint holds a '{state['method']}' run, its config says '{method.name}'")
    try:
        method.load_state(state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: does not fit this code and configuration ({err})") from None
    method.to(device_for(cfg)).eval()
    return method, cfg


def _batched(fn, x: Tensor, size: int) -> list[Any]:
    return [fn(x[i : i + size]) for i in range(0, x.shape[0], size)]


def _cat(parts: list[Any], dim: int = 0) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p, dim) for p in zip(*parts, strict=True))
    return torch.cat(parts, dim)


def refine(method: Method, x: Tensor, z0: Tensor, cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
    """``refine_steps`` of MALA from the amortised ``z0`` on the beta-tempered posterior."""
    log_step = torch.full((x.shape[0],), float(np.log(cfg.em.step_size)), device=x.device)
    res = e_step(
        method.decoder.log_prob, x, z0, log_step, steps=cfg.eval.refine_steps, beta=cfg.train.beta,
        target_accept=cfg.em.target_accept, adapt_rate=cfg.em.adapt_rate, step_max=cfg.em.step_size_max,
        max_retries=cfg.em.max_retries,
    )
    return res.z, res.gap, res.accept


@torch.no_grad()
def _posterior_mean(method: Method, x: Tensor, samples: int = 8) -> Tensor:
    if isinstance(method, GaussianVAE):
        return method.encoder(x)[0]
    return torch.stack([method.encode(x) for _ in range(samples)]).mean(0)


def evaluate(cfg: Config, run: runs.Run | None = None) -> dict[str, Any]:
    """Evaluate ``run`` (default: the run named by ``cfg.train``) and write its outputs."""
    if run is None:
        run = runs.open_run(Path(cfg.train.runs_dir) / cfg.train.run_name)
    if not (run.checkpoint_dir / "last.pt").exists():
        raise RunError(f"{run.path}: no checkpoints/last.pt — train this run before evaluating it")
    method, cfg = load_method(run, cfg)
    ev = cfg.eval
    torch.manual_seed(cfg.train.seed + 1)
    device = device_for(cfg)
    test = data.load_split(cfg.data.prepared_dir, "test")
    n = min(ev.n_test, len(test))
    x = test.x[:n].to(device)
    bs = ev.batch_size
    out: dict[str, Any] = {"method": method.name, "n_test": n, "beta": cfg.train.beta,
                           "latent_dim": cfg.model.latent_dim}

    # amortised encoding, timed
    t0 = time.perf_counter()
    z_amort = _cat(_batched(method.encode, x, bs))
    out["encode_seconds_per_1000"] = (time.perf_counter() - t0) / n * 1000
    out["encoder_nfe"] = method.encoder_nfe()
    with torch.no_grad():
        rec_amort = method.decoder.mean(z_amort)
    z_ref, gap, acc = _cat([refine(method, x[i : i + bs], z_amort[i : i + bs], cfg) for i in range(0, n, bs)])
    with torch.no_grad():
        rec_ref = method.decoder.mean(z_ref)
    mse_a, mse_r = metrics.mse(x, rec_amort), metrics.mse(x, rec_ref)
    out.update(
        mse_amortised=mse_a.mean().item(), mse_refined=mse_r.mean().item(),
        psnr_amortised_db=metrics.psnr_db(mse_a.mean().item()), psnr_refined_db=metrics.psnr_db(mse_r.mean().item()),
        sync_gap_nats=gap.mean().item(), langevin_accept=acc.mean().item(), refine_steps=ev.refine_steps,
    )

    # rate and ELBO (path bound for the diffusion encoder, closed form for the VAE)
    lls, rates = [], []
    for _ in range(ev.elbo_samples):  # average a few samples per x: a per-example ELBO, not one draw
        z_rate, rate = _cat(_batched(method.encode_with_rate, x, bs))
        with torch.no_grad():
            lls.append(method.decoder.log_prob(x, z_rate))
        rates.append(rate)
    ll, rate = torch.stack(lls).mean(0), torch.stack(rates).mean(0)
    elbo = ll - rate
    out.update(rate_nats=rate.mean().item(), distortion_nats=(-ll).mean().item(), elbo_nats=elbo.mean().item(),
               neg_elbo_nats=-elbo.mean().item(), sigma_x=method.decoder.sigma().item())
    if isinstance(method, DiffusionEM):
        si = _cat(_batched(lambda xb: method.amortised.score_integral(xb, method.encode(xb)), x, bs))
        out["rate_score_integral_nats"] = si.mean().item()

    # exact log q: ELBO with the exact rate, and IWAE-k (VAE always; diffusion for small d)
    exact_ok = isinstance(method, GaussianVAE) or cfg.model.latent_dim <= ev.exact_logq_max_dim
    elbo_exact = iwae = None
    if exact_ok:
        lj, lq_k, z_k = _cat([importance_samples(method, x[i : i + bs], ev.iwae_k) for i in range(0, n, bs)], dim=1)
        elbo_exact = (lj - lq_k).mean(0)
        iwae = metrics.iwae_bound(lj, lq_k)
        out[f"iwae_{ev.iwae_k}_nats"] = iwae.mean().item()
        out["elbo_exact_logq_nats"] = elbo_exact.mean().item()
        out["rate_exact_logq_nats"] = (lq_k - std_normal_log_prob(z_k)).mean().item()
    if isinstance(method, DiffusionEM) and method.amortised.head is not None:
        out["elbo_base_only_nats"] = _base_only_elbo(method, x, ev.elbo_samples).mean().item()

    # the decoder as a density model: log p(x) by AIS, and each bound's gap to it
    if ev.ais_n > 0:
        out.update(_evidence(method, x[: min(n, ev.ais_n)], elbo, elbo_exact, iwae, cfg))

    # latent statistics and probes
    z_mean = _cat(_batched(lambda xb: _posterior_mean(method, xb), x, bs))
    out.update(metrics.latent_statistics(z_mean.cpu(), z_amort.cpu(), ev.active_unit_threshold))
    label = test.label[:n] if test.label is not None else None
    if label is not None and n >= 20:
        half = n // 2
        zc = z_mean.cpu().numpy()
        out["probe_accuracy"] = metrics.probe_accuracy(zc[:half], label[:half], zc[half:], label[half:])

    # ground truth, where the data came from a known decoder
    truth = toy_from_manifest(test.manifest)
    posterior_rows = pd.DataFrame(columns=POSTERIOR_COLUMNS).astype(POSTERIOR_COLUMNS)
    if truth is not None:
        out.update(_ground_truth(method, truth, x, elbo, elbo_exact, cfg))
        posterior_rows = _posterior_table(method, truth, x[: min(4, n)], cfg)

    _write_tables(run, test, n, x, rec_amort, rec_ref, mse_a, mse_r, z_amort, z_mean, rate, ev.n_recon)
    run.write_table(runs.POSTERIOR, posterior_rows)  # always written: a fixed DVC output
    _write_plots(run, test, x, rec_amort, rec_ref, z_mean, label, ev.n_recon, posterior_rows)
    out = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}
    run.write_metrics(out)
    return out


def importance_samples(method: Method, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` encoder samples per x with ``log p(x, z)`` and the exact ``log q(z|x)``: ``(k, N)``,
    ``(k, N)``, ``(k, N, d)``, concatenated along x (dimension 1) by ``_cat``."""
    zs, lqs = zip(*(method.encode_with_log_q(x) for _ in range(k)), strict=True)
    z_k, lq_k = torch.stack(zs), torch.stack(lqs)
    with torch.no_grad():
        lj = method.decoder.log_prob(x.expand(k, -1, -1).reshape(-1, x.shape[1]),
                                     z_k.reshape(-1, z_k.shape[-1])).reshape(k, -1)
    return lj + std_normal_log_prob(z_k), lq_k, z_k


@torch.no_grad()
def _base_only_elbo(method: DiffusionEM, x: Tensor, samples: int) -> Tensor:
    """Per-x ELBO of the encoder's Gaussian base alone (the diffusion residual switched off).

    An ablation: the diffusion encoder's ELBO minus this is what the diffusion adds over the
    amortised Gaussian it is built on (docs/method.md §10).
    """
    mu, log_std = method.amortised.head(x)
    elbos = []
    for _ in range(samples):
        z = mu + log_std.exp() * torch.randn_like(mu)
        elbos.append(method.decoder.log_prob(x, z) + std_normal_log_prob(z) - gaussian_log_q(z, mu, log_std))
    return torch.stack(elbos).mean(0)


def _evidence(method: Method, x: Tensor, elbo: Tensor, elbo_exact: Tensor | None, iwae: Tensor | None,
              cfg: Config) -> dict[str, float]:
    """AIS ``log p(x)`` on ``x`` (the first test examples), its stability, and the bounds' gaps to it."""
    ev = cfg.eval
    settings = AISSettings(temperatures=ev.ais_temperatures, particles=ev.ais_particles, moves=ev.ais_moves,
                           step_size=ev.ais_step_size, batch_size=ev.batch_size)
    gen = torch.Generator(device=x.device).manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    log_px = ais_log_px(method.decoder.log_prob, x, cfg.model.latent_dim, settings, gen)
    k = x.shape[0]
    out = {
        "ais_log_px_nats": log_px.mean().item(),
        "ais_log_px_stderr_nats": (log_px.std() / k**0.5).item() if k > 1 else 0.0,
        "ais_gap_nats": (log_px - elbo[:k]).mean().item(),
        "ais_seconds": time.perf_counter() - t0,
        "n_ais": k,
        "ais_temperatures": ev.ais_temperatures,
    }
    if elbo_exact is not None:
        m = min(k, elbo_exact.shape[0])
        out["ais_gap_exact_logq_nats"] = (log_px[:m] - elbo_exact[:m]).mean().item()
    if iwae is not None:
        m = min(k, iwae.shape[0])
        out[f"ais_gap_iwae_{ev.iwae_k}_nats"] = (log_px[:m] - iwae[:m]).mean().item()
    if ev.ais_check_temperatures > 0:
        short = AISSettings(**{**settings.__dict__, "temperatures": ev.ais_check_temperatures})
        check = ais_log_px(method.decoder.log_prob, x, cfg.model.latent_dim, short, gen)
        # a lower bound that tightens with the ladder: this difference says how far from converged
        out["ais_ladder_change_nats"] = (log_px - check).mean().item()
        out["ais_check_temperatures"] = ev.ais_check_temperatures
    return out


def _ground_truth(method: Method, truth: LinearGaussian | Bimodal, x: Tensor, elbo: Tensor,
                  elbo_exact: Tensor | None, cfg: Config) -> dict[str, float]:
    """ELBO gaps to the exact ``log p(x)``, and (bimodal) the error in the mode masses."""
    log_px = truth.log_evidence(x.cpu()).to(x.device)
    out = metrics.gap_summary(log_px - elbo, "elbo_gap")
    out["log_px_nats"] = log_px.mean().item()
    if elbo_exact is not None:
        out.update(metrics.gap_summary(log_px[: elbo_exact.shape[0]] - elbo_exact, "elbo_gap_exact_logq"))
    if isinstance(truth, Bimodal):
        k = 64
        xs = x[: min(100, x.shape[0])]
        zk = torch.stack([method.encode(xs) for _ in range(k)])
        plus = (truth.mode_sign(xs.unsqueeze(0).cpu(), zk.cpu()) > 0).float().mean(0)
        exact = truth.mode_masses(xs.cpu())
        out["mode_mass_error"] = (plus - exact).abs().mean().item()
    return out


def _posterior_table(method: Method, truth: LinearGaussian | Bimodal, x: Tensor, cfg: Config,
                     samples: int = 400) -> pd.DataFrame:
    """Encoder samples beside exact posterior samples for a few test x (2-D views)."""
    rows = []
    g = torch.Generator().manual_seed(cfg.train.seed)
    if isinstance(truth, Bimodal):
        exact = truth.posterior_samples(x.cpu(), samples, cfg.train.beta, generator=g)
    else:
        mean, cov = truth.posterior(x.cpu(), cfg.train.beta)
        chol = torch.linalg.cholesky(cov)
        exact = mean + torch.randn(samples, *mean.shape, generator=g) @ chol.T
    enc = torch.stack([method.encode(x) for _ in range(samples)]).cpu()
    for i in range(x.shape[0]):
        for source, zz in (("exact", exact[:, i]), ("encoder", enc[:, i])):
            rows.append(pd.DataFrame({"x_index": i, "source": source, "z0": zz[:, 0].numpy(),
                                      "z1": zz[:, 1].numpy() if zz.shape[1] > 1 else 0.0}))
    return pd.concat(rows, ignore_index=True)


def _write_tables(run, test, n, x, rec_a, rec_r, mse_a, mse_r, z, z_mean, rate, n_recon) -> None:
    k = min(n_recon, n)
    h, w = (test.image_shape[1], test.image_shape[2]) if test.image_shape else (0, 0)
    recon = pd.DataFrame({
        "index": np.arange(k),
        "label": test.label[:k] if test.label is not None else pd.array([pd.NA] * k, dtype="Int64"),
        "height": h, "width": w,
        "x": list(x[:k].cpu().numpy()),
        "recon_amortised": list(rec_a[:k].cpu().numpy()),
        "recon_refined": list(rec_r[:k].cpu().numpy()),
        "mse_amortised": mse_a[:k].cpu().numpy(),
        "mse_refined": mse_r[:k].cpu().numpy(),
    })
    run.write_table(runs.RECON, recon)
    lat = {"index": np.arange(n), "rate_nats": rate.cpu().numpy()}
    if test.label is not None:
        lat["label"] = test.label[:n]
    for col in test.factors.columns:
        lat[f"factor_{col}"] = test.factors[col].to_numpy()[:n]
    for i in range(z.shape[1]):
        lat[f"z{i}"] = z[:, i].cpu().numpy()
        lat[f"mean_z{i}"] = z_mean[:, i].cpu().numpy()
    run.write_table(runs.LATENTS, pd.DataFrame(lat))


def _write_plots(run, test, x, rec_a, rec_r, z_mean, label, n_recon, posterior_rows) -> None:
    k = min(n_recon, x.shape[0])
    plots.reconstruction_grid(
        {"original": x[:k].cpu().numpy(), "amortised": rec_a[:k].cpu().numpy(), "refined": rec_r[:k].cpu().numpy()},
        test.image_shape, run.plots_dir / "reconstructions.png",
    )
    zc = z_mean.cpu().numpy()
    if zc.shape[1] > 2:
        zc = zc - zc.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        zc, title = zc @ vt[:2].T, f"{run.name}: PCA of posterior means"
    elif zc.shape[1] == 2:
        title = f"{run.name}: posterior means"
    else:
        zc, title = np.concatenate([zc, np.zeros_like(zc)], 1), f"{run.name}: posterior means"
    plots.latent_scatter(zc, label, title, run.plots_dir / "latents.png")
    hist = run.history()
    if hist is not None and len(hist):
        plots.training_curves(hist, run.plots_dir / "training.png")
    if len(posterior_rows):
        sub = posterior_rows[posterior_rows["x_index"] == 0]
        plots.posterior_samples(sub[sub.source == "encoder"][["z0", "z1"]].to_numpy(),
                                sub[sub.source == "exact"][["z0", "z1"]].to_numpy(),
                                f"{run.name}: posterior of test x #0", run.plots_dir / "posterior.png")
