"""Encoders on a fixed decoder: the amortised-inference comparison of Cremer et al. (2018).

Two decoders are trained on digits and then frozen: the Gaussian VAE's, and the paper's pure EM
one (``em.vae_steps=0``, ``em.m_step=zstar``). On each, every encoder is trained from scratch with
the decoder fixed, and scored on the held-out x against the decoder's own ``log p(x)`` (AIS):

- **Gaussian (ELBO)**: a Gaussian encoder by the reparameterised ELBO (the VAE's encoder loss),
  for the VAE's step count, and again for the diffusion encoder's wall-clock (best of both by
  validation ELBO), so it is not short of compute;
- **diffusion (EM)**: the diffusion encoder as this project trains it: its Gaussian head by the
  ELBO for the same steps, then EM with the decoder frozen (``em.m_step=frozen``);
- **per-x Gaussian fit** (not amortised): for each x the full-covariance and diagonal Gaussian
  moment-matched to long MALA chains. Its gap is the Gaussian family's own (the approximation
  gap); the amortised encoders' extra gap is the amortisation gap.

Bounds are the exact-log-q ELBO and IWAE-k; gaps are AIS − bound, mean over x with a 95 %
bootstrap interval.

    python -m benchmarks.fixed_decoder [--quick]
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import Timer, Workspace, arg_parser, save_figure, table, write_result
from diffenc_core import checkpoint, config, data, metrics, optim, trainer
from diffenc_core.em import DiffusionEM
from diffenc_core.evaluate import flow_proposal, importance_weights
from diffenc_core.evidence import AISSettings, ais_log_px
from diffenc_core.langevin import langevin
from diffenc_core.rate import std_normal_log_prob
from diffenc_core.vae import GaussianVAE

DIGITS = ["data.dataset=digits", "train.threads=1", "train.log_every=100"]
PROFILES = {  # steps of each phase, IWAE samples, AIS ladder (and the ladders of the stability check), MCMC
    "quick": {"steps": 300, "em_steps": 300, "iwae_k": 8, "ais": 100, "ladders": (10, 30, 100), "chains": 16,
              "mcmc": 100, "val_every": 100},
    "full": {"steps": 2000, "em_steps": 2000, "iwae_k": 32, "ais": 1000, "ladders": (30, 100, 300, 1000, 3000),
             "chains": 64, "mcmc": 500, "val_every": 250},
}


# ---------------------------------------------------------------------------------- decoders
def train_decoders(ws: Workspace, p: dict[str, int]) -> dict[str, dict[str, Tensor]]:
    """The two decoders' state dicts: the VAE's and the paper's pure-EM one."""
    runs_ = {
        "VAE decoder": ["train.method=vae", "train.run=decoder-vae"],
        "EM decoder": ["train.method=diffusion", "train.run=decoder-em", "em.vae_steps=0", "em.m_step=zstar"],
    }
    out = {}
    for name, sets in runs_.items():
        cfg = ws.config(*DIGITS, *sets, f"train.steps={p['steps']}", f"train.val_every={p['val_every']}")
        run = trainer.train(cfg, "overwrite", progress=False)  # a measurement always trains afresh
        path = run.checkpoint_dir / ("best.pt" if (run.checkpoint_dir / "best.pt").exists() else "last.pt")
        models = checkpoint.load(path)["models"]
        out[name] = {k.removeprefix("decoder."): v for k, v in models.items() if k.startswith("decoder.")}
        print(f"trained the {name} ({run.path})", flush=True)
    return out


def ais_ladder(decoder: torch.nn.Module, x: Tensor, z_dim: int, ladders: tuple[int, ...],
               seeds: int = 2) -> list[dict[str, float]]:
    """The AIS estimate against the ladder length (the stability figure): a stochastic lower bound
    that rises to log p(x) and flattens once the ladder is long enough; two seeds show the spread."""
    rows = []
    for temps in ladders:
        ests = [float(ais_log_px(decoder.log_prob, x, z_dim, AISSettings(temperatures=temps),
                                 torch.Generator().manual_seed(seed)).mean()) for seed in range(seeds)]
        rows.append({"temperatures": temps, "ais_log_px_nats": sum(ests) / seeds,
                     "seed_spread_nats": max(ests) - min(ests)})
        print(f"  AIS with {temps} temperatures: {rows[-1]['ais_log_px_nats']:.3f} "
              f"(seed spread {rows[-1]['seed_spread_nats']:.3f})", flush=True)
    return rows


# ---------------------------------------------------------------------------------- encoders
def _fix_decoder(method: DiffusionEM | GaussianVAE, state: dict[str, Tensor]) -> None:
    method.decoder.load_state_dict(state)
    method.decoder.requires_grad_(False)


@torch.no_grad()
def _val_elbo(method: DiffusionEM | GaussianVAE, x: Tensor) -> float:
    return trainer.Validation(x)(method)["val_neg_elbo"] * -1.0


def fit_encoder(cfg: config.Config, method: DiffusionEM | GaussianVAE, examples: trainer.TrainingSet,
                x_val: Tensor, budget_s: float | None = None) -> dict[str, Any]:
    """Train ``method``'s encoder with its decoder frozen; keep the best state by validation ELBO.

    Runs ``cfg.total_steps`` steps, or, with ``budget_s``, until that much training time has passed
    (the step count then only shapes the learning-rate schedule).
    """
    total = cfg.total_steps
    best, best_state, step, elapsed = -math.inf, None, 0, 0.0
    every = cfg.train.val_every
    n = examples.x.shape[0]
    while step < total and (budget_s is None or elapsed < budget_s):
        t0 = time.perf_counter()
        idx = trainer.batch_indices(cfg.train.seed, step, n, cfg.train.batch_size)
        optim.set_lr(method.optimizers(), optim.lr_scale(cfg, step, elapsed, *method.phase_bounds(step, total)))
        method.train_step(step, idx, examples(idx))
        elapsed += time.perf_counter() - t0
        step += 1
        final_phase = method.phase_bounds(step - 1, total)[1] == total
        if final_phase and (step % every == 0 or step == total):
            val = _val_elbo(method, x_val)
            if val > best:
                best, best_state = val, copy.deepcopy(method.state_dict())
    if best_state is not None:
        method.load_state_dict(best_state)
    method.eval()
    return {"train_seconds": elapsed, "train_steps": step, "best_val_elbo_nats": best}


def bounds(method: DiffusionEM | GaussianVAE, x: Tensor, log_px: Tensor, k: int) -> dict[str, Any]:
    """Exact-log-q ELBO and IWAE-k per x, and their gaps to AIS with bootstrap intervals."""
    w = importance_weights(flow_proposal(method.encode_with_log_q), method.decoder.log_prob, x, k)
    elbo, iwae = w.elbo(), w.iwae()
    out: dict[str, Any] = {"elbo_nats": float(elbo.mean()), f"iwae_{k}_nats": float(iwae.mean())}
    for name, b in (("elbo", elbo), ("iwae", iwae)):
        gap = log_px - b
        lo, hi = metrics.bootstrap_mean_interval(gap)
        out[f"{name}_gap_nats"], out[f"{name}_gap_ci"] = float(gap.mean()), [lo, hi]
    return out


# ------------------------------------------------------------------------ per-x Gaussian fit
def per_x_gaussian(decoder: torch.nn.Module, x: Tensor, z0: Tensor, log_px: Tensor, p: dict[str, int],
                   k: int = 256) -> dict[str, dict[str, Any]]:
    """Full-covariance and diagonal Gaussians moment-matched to MALA chains, one per x (not amortised)."""
    c = p["chains"]
    xr = x.repeat(c, 1)
    res = langevin(decoder.log_prob, xr, z0.repeat(c, 1), math.log(0.01), steps=p["mcmc"])
    chunks, z, log_step = [], res.z, res.log_step
    for _ in range(4):  # four thinned draws per chain
        res = langevin(decoder.log_prob, xr, z, log_step, steps=max(5, p["mcmc"] // 10))
        z, log_step = res.z, res.log_step
        chunks.append(z.view(c, x.shape[0], -1))
    s = torch.cat(chunks).double()
    d = s.shape[-1]
    mean = s.mean(0)
    cen = s - mean
    cov = torch.einsum("knd,kne->nde", cen, cen) / (s.shape[0] - 1) + 1e-6 * torch.eye(d, dtype=s.dtype)
    families = {"per-x Gaussian fit, full covariance": torch.linalg.cholesky(cov),
                "per-x Gaussian fit, diagonal": torch.diag_embed(cen.pow(2).mean(0).sqrt())}
    out = {}
    for name, chol in families.items():
        eps = torch.randn(k, *mean.shape, dtype=s.dtype)
        zq = mean + torch.einsum("nde,kne->knd", chol, eps)
        lq = std_normal_log_prob(eps) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        zq, lq = zq.float(), lq.float()
        with torch.no_grad():
            lj = decoder.log_prob(x.expand(k, -1, -1).reshape(-1, x.shape[1]),
                                  zq.reshape(-1, d)).reshape(k, -1) + std_normal_log_prob(zq)
        elbo = (lj - lq).mean(0)
        gap = log_px - elbo
        lo, hi = metrics.bootstrap_mean_interval(gap)
        out[name] = {"elbo_nats": float(elbo.mean()), "elbo_gap_nats": float(gap.mean()), "elbo_gap_ci": [lo, hi]}
    return out


# -------------------------------------------------------------------------------------- main
def main() -> None:
    ap = arg_parser(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(1)
    timer = Timer()
    profile = "quick" if args.quick else "full"
    p = PROFILES[profile]
    ws = Workspace(args.keep)
    cfg0 = ws.prepare(*DIGITS)
    train_x = data.load_split(cfg0.data.prepared_dir, "train").x
    val_x = data.load_split(cfg0.data.prepared_dir, "val").x
    test_x = data.load_split(cfg0.data.prepared_dir, "test").x
    manifest = data.read_manifest(cfg0.data.prepared_dir)
    decoders = train_decoders(ws, p)
    enc_sets = [*DIGITS, f"train.val_every={p['val_every']}"]
    rows, results = [], {"profile": profile, "n_test": int(test_x.shape[0]), "decoders": {}}
    for dec_name, dec_state in decoders.items():
        torch.manual_seed(0)
        probe = trainer.build_method(ws.config(*enc_sets, "train.method=vae"), manifest)
        _fix_decoder(probe, dec_state)
        ladder = ais_ladder(probe.decoder, test_x, cfg0.model.latent_dim, p["ladders"])
        log_px = ais_log_px(probe.decoder.log_prob, test_x, cfg0.model.latent_dim,
                            AISSettings(temperatures=p["ais"]), torch.Generator().manual_seed(0))
        entry: dict[str, Any] = {"ais_log_px_nats": float(log_px.mean()), "ais_temperatures": p["ais"],
                                 "ais_ladder": ladder, "encoders": {}}
        print(f"{dec_name}: AIS log p(x) = {log_px.mean():.3f} over {len(test_x)} test x", flush=True)

        dcfg = ws.config(*enc_sets, "train.method=diffusion", "em.m_step=frozen", f"em.vae_steps={p['steps']}",
                         f"train.steps={p['em_steps']}")
        torch.manual_seed(0)
        diff = trainer.build_method(dcfg, manifest)
        diff.attach_data(trainer.TrainingSet(train_x))
        _fix_decoder(diff, dec_state)
        fit = fit_encoder(dcfg, diff, trainer.TrainingSet(train_x), val_x)
        entry["encoders"]["diffusion (EM)"] = {**fit, **bounds(diff, test_x, log_px, p["iwae_k"])}

        for label, budget in (("Gaussian (ELBO), VAE's steps", None),
                              ("Gaussian (ELBO), diffusion's wall-clock", fit["train_seconds"])):
            steps = p["steps"] if budget is None else 100 * p["steps"]
            gcfg = ws.config(*enc_sets, "train.method=vae", f"train.steps={steps}")
            torch.manual_seed(0)
            gauss = trainer.build_method(gcfg, manifest)
            _fix_decoder(gauss, dec_state)
            gfit = fit_encoder(gcfg, gauss, trainer.TrainingSet(train_x), val_x, budget_s=budget)
            entry["encoders"][label] = {**gfit, **bounds(gauss, test_x, log_px, p["iwae_k"])}

        with torch.no_grad():
            z0 = diff.encode(test_x)
        entry["encoders"].update(per_x_gaussian(diff.decoder, test_x, z0, log_px, p))
        for enc, r in entry["encoders"].items():
            rows.append({"decoder": dec_name, "encoder": enc, **r,
                         "elbo_gap_ci": "[{:.2f}, {:.2f}]".format(*r["elbo_gap_ci"])})
            print(dec_name, enc, {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}, flush=True)
        results["decoders"][dec_name] = entry
    results["plot"] = plot(results, args.quick)
    results["wall_seconds"] = timer.seconds
    cols = ["decoder", "encoder", "elbo_nats", f"iwae_{p['iwae_k']}_nats", "elbo_gap_nats", "elbo_gap_ci",
            "iwae_gap_nats", "train_steps", "train_seconds"]
    print("\n## Encoders on a fixed decoder (digits test x; gaps to AIS log p(x), nats)\n")
    print(table(rows, cols, 4))
    print("wrote", write_result("fixed_decoder", results, args.quick), f"in {timer.seconds:.0f} s")


def plot(results: dict[str, Any], quick: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decs = list(results["decoders"])
    fig, axes = plt.subplots(1, len(decs) + 1, figsize=(5.5 * (len(decs) + 1), 3.6), squeeze=False)
    stab = axes[0][-1]
    for dec in decs:
        lad = results["decoders"][dec]["ais_ladder"]
        stab.errorbar([r["temperatures"] for r in lad], [r["ais_log_px_nats"] for r in lad],
                      yerr=[r["seed_spread_nats"] / 2 for r in lad], marker="o", capsize=3, label=dec)
    stab.set_xscale("log")
    stab.set_xlabel("AIS temperatures")
    stab.set_ylabel("mean AIS log p(x) (nats)")
    stab.set_title("AIS stability: estimate vs ladder length", fontsize=9)
    stab.legend(fontsize=7)
    for ax, dec in zip(axes[0][:-1], decs, strict=True):
        encs = results["decoders"][dec]["encoders"]
        names = list(encs)
        gaps = [encs[n]["elbo_gap_nats"] for n in names]
        err = [[g - encs[n]["elbo_gap_ci"][0] for n, g in zip(names, gaps, strict=True)],
               [encs[n]["elbo_gap_ci"][1] - g for n, g in zip(names, gaps, strict=True)]]
        ax.barh(range(len(names)), gaps, xerr=err, color="tab:blue", alpha=0.8)
        ax.set_yticks(range(len(names)), [n.replace(", ", ",\n") for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("AIS log p(x) − ELBO (nats; 95 % bootstrap interval)")
        ax.set_title(f"{dec}: AIS log p(x) = {results['decoders'][dec]['ais_log_px_nats']:.2f}", fontsize=9)
    return save_figure(fig, "fixed_decoder", quick)


if __name__ == "__main__":
    main()
