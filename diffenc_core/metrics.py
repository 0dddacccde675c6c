"""Metric functions (docs/method.md §8): reconstruction, bounds, latent statistics, probes.

Plain functions of tensors; ``evaluate`` decides what to feed them. Log-likelihoods are nats
per example; images live in [0, 1], so PSNR uses a peak of 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-example mean squared error."""
    return (x - x_hat).pow(2).mean(-1)


def psnr_db(mse_value: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in decibels for a mean squared error."""
    return 10.0 * math.log10(peak**2 / max(mse_value, 1e-12))


def log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def iwae_bound(log_joint: Tensor, log_q: Tensor) -> Tensor:
    """``log (1/k) sum_i p(x, z_i) / q(z_i|x)`` from ``(k, N)`` log densities; ``(N,)``."""
    return log_mean_exp(log_joint - log_q, dim=0)


def gaussian_kl_to_prior(z: Tensor) -> float:
    """KL between the moment-matched Gaussian of the samples ``z (N, d)`` and ``N(0, I)``.

    The distance between the aggregate posterior and the prior: 0 when the encoder's codes, pooled
    over the data, look like the prior in their first two moments.
    """
    zd = z.double()
    mean = zd.mean(0)
    cov = torch.cov(zd.T).reshape(zd.shape[1], zd.shape[1])
    cov = cov + 1e-9 * torch.eye(zd.shape[1], dtype=zd.dtype)
    d = zd.shape[1]
    return float(0.5 * (torch.trace(cov) + mean @ mean - d - torch.logdet(cov)))


def latent_statistics(z_mean: Tensor, z_sample: Tensor, threshold: float = 0.01) -> dict[str, float | list]:
    """Per-dimension mean and variance, active units, and aggregate-posterior vs prior distance.

    A unit is active when the variance over x of its posterior mean exceeds ``threshold``.
    """
    var_of_mean = z_mean.var(0)
    return {
        "latent_mean": z_sample.mean(0).tolist(),
        "latent_var": z_sample.var(0).tolist(),
        "latent_var_of_mean": var_of_mean.tolist(),
        "active_units": int((var_of_mean > threshold).sum()),
        "aggregate_kl_to_prior_nats": gaussian_kl_to_prior(z_sample),
    }


def probe_accuracy(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of a logistic-regression probe from latents to labels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    clf.fit(z_train, y_train)
    return float(clf.score(z_test, y_test))


def probe_r2(z_train: np.ndarray, f_train: np.ndarray, z_test: np.ndarray, f_test: np.ndarray) -> float:
    """Held-out R² of a ridge probe from latents to a continuous factor."""
    from sklearn.linear_model import RidgeCV

    reg = RidgeCV(alphas=np.logspace(-3, 3, 7)).fit(z_train, f_train)
    return float(reg.score(z_test, f_test))


def bootstrap_mean_interval(
    values: Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling examples with replacement).

    Gaps over held-out x are heavy-tailed (a few far-out x carry much of the mean), so a normal
    interval would be too narrow; the bootstrap follows the tail.
    """
    v = values.detach().double().cpu().flatten()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (resamples, v.numel()), generator=g)
    means = v[idx].mean(1)
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype))
    return float(lo), float(hi)


def gap_summary(gaps: Tensor, prefix: str) -> dict[str, float]:
    """Mean (with a 95 % bootstrap interval), median and worst-third mean of an ELBO-gap vector (nats)."""
    g = gaps.double()
    worst = torch.sort(g, descending=True).values[: max(1, g.numel() // 3)]
    lo, hi = bootstrap_mean_interval(g)
    return {
        f"{prefix}_mean_nats": float(g.mean()),
        f"{prefix}_mean_ci_low_nats": lo,
        f"{prefix}_mean_ci_high_nats": hi,
        f"{prefix}_median_nats": float(g.median()),
        f"{prefix}_worst_third_nats": float(worst.mean()),
    }
