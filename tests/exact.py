"""The exact score of the linear-Gaussian posterior as an ``eps_fn``, for sampler and rate tests."""

from __future__ import annotations

import torch

from diffenc_core.schedule import LogSNRSchedule
from diffenc_core.toys import LinearGaussian


def exact_eps_fn(toy: LinearGaussian, x: torch.Tensor, schedule: LogSNRSchedule):
    """eps_hat = -sigma * (exact score of the posterior diffused to logsnr)."""

    def fn(z, logsnr):
        alpha, sigma = schedule.alpha_sigma(logsnr)
        return -sigma.reshape(-1, 1) * toy.score(z, x, alpha, sigma)

    return fn


def linear_gaussian_case(n: int = 4000):
    """The linear-Gaussian toy of method.md §9, ``n`` held-out x, the schedule and the exact eps_fn."""
    toy = LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)
    x, _ = toy.sample(n, torch.Generator().manual_seed(0))
    schedule = LogSNRSchedule()
    return toy, x, schedule, exact_eps_fn(toy, x, schedule)
