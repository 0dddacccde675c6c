"""Posterior fidelity on the toys with a known decoder (docs/method.md §7).

For the linear-Gaussian and the bimodal toy the decoder is fixed to the truth
(``model.decoder.kind=truth``), so every encoder can be scored against the exact ``log p(x)``:
the ELBO gap (mean / median nats over held-out x), the mode-mass error (bimodal), and the rate
estimators against the exact rate. Three encoders: the diffusion encoder trained by EM, the
Gaussian (VAE) encoder, and raw Langevin from the prior (no encoder; its gap is a k-NN estimate).

    python -m benchmarks.posterior_fidelity [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.spatial import cKDTree

from benchmarks.common import Workspace, write_result
from diffenc_core import data
from diffenc_core.langevin import e_step
from diffenc_core.toys import Bimodal, LinearGaussian, std_normal_log_prob, toy_from_manifest

TOYS = {
    "linear_gaussian": ["em.e_step=mala"],
    "bimodal": ["em.e_step=smc"],
}


def knn_kl_gap(samples: np.ndarray, log_joint: np.ndarray, log_px: float) -> float:
    """``KL(q || p(z|x)) = -H(q) - E_q log p(z|x)`` with the Kozachenko–Leonenko entropy (k=1)."""
    n, d = samples.shape
    dist, _ = cKDTree(samples).query(samples, k=2)
    r = np.maximum(dist[:, 1], 1e-12)
    log_vol_ball = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1)
    entropy = d * np.mean(np.log(r)) + log_vol_ball + math.log(n - 1) + np.euler_gamma
    return float(-entropy - np.mean(log_joint - log_px))


def raw_langevin(truth: LinearGaussian | Bimodal, x: torch.Tensor, steps: int, chains: int = 400) -> dict:
    """MALA from the prior, no encoder: mode-mass error and a k-NN estimate of the gap."""
    n = x.shape[0]
    xr = x.repeat(chains, 1)
    z0 = torch.randn(xr.shape[0], truth.z_dim)
    res = e_step(truth.log_lik, xr, z0, math.log(0.05), steps=steps)
    z = res.z.reshape(chains, n, -1)
    log_px = truth.log_evidence(x)
    gaps = []
    for i in range(n):
        zi = z[:, i]
        lj = truth.log_lik(x[i : i + 1].expand(chains, -1), zi) + std_normal_log_prob(zi)
        gaps.append(knn_kl_gap(zi.double().numpy(), lj.double().numpy(), float(log_px[i])))
    out = {"elbo_gap_knn_mean_nats": float(np.mean(gaps)), "elbo_gap_knn_median_nats": float(np.median(gaps)),
           "langevin_steps": steps}
    if isinstance(truth, Bimodal):
        plus = (truth.mode_sign(x.unsqueeze(0), z) > 0).float().mean(0)
        out["mode_mass_error"] = float((plus - truth.mode_masses(x)).abs().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="minutes, not an hour")
    ap.add_argument("--steps", type=int, default=None, help="training steps per encoder")
    ap.add_argument("--keep", default=None, help="keep the workspace in this folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (1500 if args.quick else 8000)
    ws = Workspace(args.keep)
    results: dict = {"steps": steps, "toys": {}}
    common = [f"train.steps={steps}", "model.latent_dim=2", "model.decoder.kind=truth", "train.batch_size=256",
              "model.encoder.hidden=128", "model.vae.hidden=128", "train.val_every=500", "train.log_every=100",
              "train.checkpoint_every=1000", "eval.n_test=200", "eval.exact_logq_max_dim=2", "eval.iwae_k=16"]
    for toy, extra in TOYS.items():
        cfg = ws.prepare(f"data.dataset={toy}", "data.count=20000")
        truth = toy_from_manifest(data.read_manifest(cfg.data.prepared_dir))
        row: dict = {}
        for method in ("diffusion", "vae"):
            t0 = time.perf_counter()
            out = ws.train_and_evaluate(f"data.dataset={toy}", "data.count=20000", f"train.method={method}",
                                        f"train.run={toy}-{method}", *common, *extra)
            out["wall_seconds"] = time.perf_counter() - t0
            row[method] = {k: v for k, v in out.items() if not isinstance(v, list)}
            print(toy, method, {k: round(v, 4) for k, v in row[method].items() if "gap" in k or "mass" in k})
        test = data.load_split(cfg.data.prepared_dir, "test")
        x = test.x[:50]
        row["raw_langevin"] = raw_langevin(truth, x, steps=100)
        if isinstance(truth, LinearGaussian):
            row["exact_rate_nats"] = float(truth.kl_to_prior(test.x[:200]).mean())
        print(toy, "raw_langevin", row["raw_langevin"])
        results["toys"][toy] = row
    print("wrote", write_result("posterior_fidelity", results))


if __name__ == "__main__":
    main()
