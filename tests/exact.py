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
