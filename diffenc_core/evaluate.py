"""Evaluate a trained run (docs/method.md §8) and write its metrics, tables and plots.

Reads ``checkpoints/best.pt`` (or ``last.pt``: ``eval.checkpoint``) and the test split; writes
``metrics.json``, ``recon.parquet``,
``latents.parquet``, ``posterior.parquet`` (samples for the toys with a known posterior, else empty) and
``plots/*.png``. The model configuration comes from the checkpoint; ``eval`` from the caller.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from diffenc_core import checkpoint, data, metrics, plots, runs
from diffenc_core.config import Config, from_stored
from diffenc_core.em import DiffusionEM
from diffenc_core.errors import CheckpointError, RunError
from diffenc_core.evidence import AISSettings, ais_until_converged
from diffenc_core.langevin import refine as langevin_refine
from diffenc_core.toys import Bimodal, LinearGaussian, std_normal_log_prob, toy_from_manifest
from diffenc_core.trainer import build_method, device_for
from diffenc_core.vae import GaussianVAE, gaussian_log_q

Method = DiffusionEM | GaussianVAE
# (x (n, D), m) -> m draws per x ``z (m, n, d)`` and their ``log q(z|x) (m, n)``, detached
Proposal = Callable[[Tensor, int], tuple[Tensor, Tensor]]
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
    cfg = from_stored(state["config"], f"{path}[config]")
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


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return torch.cat(parts)


def refine(method: Method, x: Tensor, z0: Tensor, cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
    """``refine_steps`` of MALA from the amortised ``z0`` on the beta-tempered posterior."""
    log_step = torch.full((x.shape[0],), float(np.log(cfg.em.step_size)), device=x.device)
    res = langevin_refine(
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
               neg_elbo_nats=-elbo.mean().item())
    if hasattr(method.decoder, "sigma"):  # a Gaussian decoder's observation std
        out["sigma_x"] = method.decoder.sigma().item()
    if isinstance(method, DiffusionEM):
        def score_integral(xb: Tensor) -> Tensor:
            return method.amortised.score_integral(xb, method.encode(xb), log_lik=method.log_lik)

        si = _cat(_batched(score_integral, x, bs))
        out["rate_score_integral_nats"] = si.mean().item()

    # exact log q (ELBO with the exact rate, IWAE-k) and the Gaussian heads' large-k IWAE; every
    # per-x lower bound on log p(x) is kept for the AIS check
    bound_values, bound_out = _importance_bounds(method, x, cfg)
    out.update(bound_out)
    bounds = {"elbo_nats": elbo, **bound_values}

    # the decoder as a density model: log p(x) by AIS, and each bound's gap to it
    if ev.ais_n > 0:
        out.update(_evidence(method, x[: min(n, ev.ais_n)], bounds, cfg))

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
        out.update(_ground_truth(method, truth, x, elbo, bounds.get("elbo_exact_logq_nats"), cfg))
        posterior_rows = _posterior_table(method, truth, x[: min(4, n)], cfg)

    _write_tables(run, test, n, x, rec_amort, rec_ref, mse_a, mse_r, z_amort, z_mean, rate, ev.n_recon)
    run.write_table(runs.POSTERIOR, posterior_rows)  # always written: a fixed DVC output
    _write_plots(run, test, x, rec_amort, rec_ref, z_mean, label, ev.n_recon, posterior_rows)
    out = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}
    run.write_metrics(out)
    return out


@dataclass(frozen=True)
class ImportanceWeights:
    """``k`` proposal draws per x: ``log p(x, z)``, ``log q(z|x)`` and ``log p(z)``, each ``(k, N)``."""

    log_joint: Tensor
    log_q: Tensor
    log_prior: Tensor

    def elbo(self) -> Tensor:
        """Per-x ELBO with the exact ``log q``, averaged over all ``k`` draws."""
        return (self.log_joint - self.log_q).mean(0)

    def iwae(self, k: int | None = None) -> Tensor:
        """Per-x IWAE bound from the first ``k`` draws (all by default)."""
        return metrics.iwae_bound(self.log_joint[:k], self.log_q[:k])

    def rate(self) -> Tensor:
        """Per-x ``E_q[log q(z|x) − log p(z)]``, the exact rate."""
        return (self.log_q - self.log_prior).mean(0)


def flow_proposal(encode_with_log_q: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Proposal:
    """Draws of an encoder whose ``encode_with_log_q(x)`` gives one sample per row and its exact
    ``log q``: the ``m`` draws of every x go through it as one batch (``m * n`` rows)."""

    def propose(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
        z, log_q = encode_with_log_q(x.repeat(m, *([1] * (x.dim() - 1))))  # row i*n + j is x[j]
        return z.reshape(m, x.shape[0], -1), log_q.reshape(m, x.shape[0])

    return propose


def gaussian_proposal(head: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Proposal:
    """Draws of ``N(mu(x), diag std(x)^2)`` with the closed-form ``log q``; ``head(x) -> (mu, log_std)``
    runs once per x, however many draws."""

    @torch.no_grad()
    def propose(x: Tensor, m: int) -> tuple[Tensor, Tensor]:
        mu, log_std = head(x)
        z = mu + log_std.exp() * torch.randn((m, *mu.shape), dtype=mu.dtype, device=mu.device)
        return z, gaussian_log_q(z, mu, log_std)

    return propose


def _draws(
    propose: Proposal, log_lik, x: Tensor, k: int, rows: int
) -> Iterator[tuple[slice, slice, Tensor, Tensor, Tensor]]:
    """``(draws, xs, z (m, n, d), log p(x|z) (m, n), log q (m, n))``: ``k`` draws per x, in passes of
    at most ``rows`` (x, draw) pairs, so memory does not grow with ``k``. A pass holds as few x as
    lets all their draws fit: a Gaussian head then runs once per x."""
    per = max(1, min(x.shape[0], rows // k))
    for i in range(0, x.shape[0], per):
        xb = x[i : i + per]
        nb = xb.shape[0]
        m_max = max(1, rows // nb)
        for j in range(0, k, m_max):
            m = min(m_max, k - j)
            z, log_q = propose(xb, m)
            with torch.no_grad():
                ll = log_lik(xb.expand(m, *xb.shape).reshape(m * nb, *xb.shape[1:]),
                             z.reshape(m * nb, z.shape[-1])).reshape(m, nb)
            yield slice(j, j + m), slice(i, i + nb), z, ll, log_q


def importance_weights(propose: Proposal, log_lik, x: Tensor, k: int, rows: int = 1024) -> ImportanceWeights:
    """``k`` draws of ``propose`` per x and their log densities, ``rows`` (x, draw) pairs per pass."""
    # written into tensors allocated once: many small kept pieces would fragment the heap (RSS grew
    # ~2 MB per x at k = 1000)
    w = ImportanceWeights(*(x.new_empty(k, x.shape[0]) for _ in range(3)))
    for draws, xs, z, ll, log_q in _draws(propose, log_lik, x, k, rows):
        log_prior = std_normal_log_prob(z)
        w.log_joint[draws, xs], w.log_q[draws, xs], w.log_prior[draws, xs] = ll + log_prior, log_q, log_prior
    return w


def _importance_bounds(method: Method, x: Tensor, cfg: Config) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Per-x bounds from importance sampling, keyed by their metric name, and the metrics.

    The encoder's own samples give the exact-log-q ELBO and IWAE-``iwae_k`` (the diffusion encoder
    through its flow's Jacobian, up to ``exact_logq_max_dim``); a Gaussian with closed-form
    ``log q`` (the VAE's encoder, the diffusion encoder's head) also gives IWAE-``iwae_k_gaussian``.
    All on the first ``importance_n`` x (all by default).
    """
    ev = cfg.eval
    rows = ev.iwae_rows
    k_gauss = ev.iwae_k_gaussian
    log_lik = method.decoder.log_prob
    x = x[: ev.importance_n or None]
    bounds: dict[str, Tensor] = {}
    out: dict[str, Any] = {"n_importance": x.shape[0]}
    own = None
    if isinstance(method, GaussianVAE):
        own = importance_weights(gaussian_proposal(method.encoder), log_lik, x, max(ev.iwae_k, k_gauss), rows)
    elif cfg.model.latent_dim <= ev.exact_logq_max_dim:
        t0 = time.perf_counter()
        own = importance_weights(flow_proposal(method.encode_with_log_q), log_lik, x, ev.iwae_k, rows)
        out["exact_logq_seconds"] = time.perf_counter() - t0
    if own is not None:
        bounds["elbo_exact_logq_nats"] = own.elbo()
        bounds[f"iwae_{ev.iwae_k}_nats"] = own.iwae(ev.iwae_k)
        out["rate_exact_logq_nats"] = own.rate().mean().item()
        if isinstance(method, GaussianVAE) and k_gauss > ev.iwae_k:
            bounds[f"iwae_{k_gauss}_nats"] = own.iwae()
    if isinstance(method, DiffusionEM) and method.amortised.head is not None:
        # the encoder's Gaussian head alone (the diffusion residual switched off): what the diffusion
        # adds over the amortised Gaussian it is built on (docs/method.md §10)
        head = importance_weights(gaussian_proposal(method.amortised.head), log_lik, x,
                                  max(ev.elbo_samples, k_gauss), rows)
        bounds["elbo_base_only_nats"] = head.elbo()
        if k_gauss > 0:
            bounds[f"iwae_base_only_{k_gauss}_nats"] = head.iwae()
    out.update({key: value.mean().item() for key, value in bounds.items()})
    return bounds, out


def _evidence(method: Method, x: Tensor, bounds: dict[str, Tensor], cfg: Config) -> dict[str, Any]:
    """AIS ``log p(x)`` on ``x`` (the first test examples), grown until no bound on the same x is
    above it, its stability, and the bounds' gaps to it."""
    ev = cfg.eval
    k = x.shape[0]
    settings = AISSettings(temperatures=ev.ais_temperatures, particles=ev.ais_particles, moves=ev.ais_moves,
                           step_size=ev.ais_step_size, batch_size=ev.batch_size)
    max_temps = max(ev.ais_temperatures, ev.ais_max_temperatures)
    tolerance = ev.ais_ladder_tolerance
    # the check is against the bound with the highest mean on the x every bound covers (IWAE, when there
    # is one); a bound on fewer x (eval.importance_n) is paired with AIS on those x alone
    bounds = {name: b[:k] for name, b in bounds.items()}
    common = min(b.shape[0] for b in bounds.values())
    best = max(bounds, key=lambda name: bounds[name][:common].mean().item())
    gen = torch.Generator(device=x.device).manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    res = ais_until_converged(method.decoder.log_prob, x, cfg.model.latent_dim, settings, bounds[best],
                              max_temps, gen, ev.ais_check_temperatures, tolerance, ev.ais_check_n or None)
    log_px = res.log_px
    out: dict[str, Any] = {
        "ais_log_px_nats": log_px.mean().item(),
        "ais_log_px_stderr_nats": (log_px.std() / k**0.5).item() if k > 1 else 0.0,
        "n_ais": k,
        "ais_temperatures": res.temperatures,
        "ais_rounds": res.rounds,
        "ais_bound": best,
        "ais_minus_bound_nats": res.minus_bound_nats,
        "ais_minus_bound_se_nats": res.minus_bound_se_nats,
        "ais_converged": res.converged,
    }
    gaps = {"elbo_nats": "ais_gap_nats", "elbo_exact_logq_nats": "ais_gap_exact_logq_nats",
            f"iwae_{ev.iwae_k}_nats": f"ais_gap_iwae_{ev.iwae_k}_nats"}
    out.update({gap: (log_px[: len(bounds[name])] - bounds[name]).mean().item()
                for name, gap in gaps.items() if name in bounds})
    # a lower bound that tightens with the ladder: the change from the shorter ladder on the same x (the
    # check ladder, or a grown ladder's previous round) says how far from converged
    if res.shorter is not None:
        out["ais_ladder_change_nats"] = (log_px[: len(res.shorter)] - res.shorter).mean().item()
        out["ais_check_temperatures"] = res.shorter_temperatures
        out["n_ais_check"] = len(res.shorter)
    out["ais_seconds"] = time.perf_counter() - t0
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
