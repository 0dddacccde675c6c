"""Samplers of the encoder's reverse process on a uniform log-SNR grid (docs/method.md §4, §5, §9).

Each takes an ``eps_fn(z, logsnr) -> eps_hat`` closure (``logsnr`` given as an ``(N,)`` tensor)
and knows nothing about the network. All start at ``z_T ~ N(0, I)`` on ``logsnr_min`` and stop
on ``logsnr_max``, evaluating ``eps_fn`` once per step (``steps`` evaluations in total).
Schedule coefficients are computed in float64 and cast to ``z_T``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffenc_core.schedule import LogSNRSchedule

EpsFn = Callable[[Tensor, Tensor], Tensor]


def _coefficients(schedule: LogSNRSchedule, steps: int, z: Tensor) -> tuple[Tensor, ...]:
    lam = schedule.grid(steps, device=z.device, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(lam)
    return lam, alpha, sigma


def _logsnr_batch(lam: Tensor, z: Tensor) -> Tensor:
    return lam.to(z.dtype).expand(z.shape[0])


def dpmpp_2m(eps_fn: EpsFn, z_T: Tensor, schedule: LogSNRSchedule, steps: int = 10) -> Tensor:
    """DPM-Solver++(2M): deterministic second-order multistep ODE solver in data prediction.

    Returns the state on ``logsnr_max`` (sigma ~ 2.5e-3 by default), which is the solver's
    clean estimate; no extra denoising evaluation.
    """
    lam, alpha, sigma = _coefficients(schedule, steps, z_T)
    h = (lam[1:] - lam[:-1]) / 2  # DPM-Solver's lambda is log(alpha/sigma) = logsnr/2
    z = z_T
    x0_prev = None
    for i in range(steps):
        eps = eps_fn(z, _logsnr_batch(lam[i], z))
        x0 = (z - sigma[i].to(z) * eps) / alpha[i].to(z)
        if x0_prev is None:
            d = x0
        else:
            r = (h[i - 1] / h[i]).to(z)
            d = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        z = (sigma[i + 1] / sigma[i]).to(z) * z - (alpha[i + 1] * torch.expm1(-h[i])).to(z) * d
        x0_prev = x0
    return z


def ddim(eps_fn: EpsFn, z_T: Tensor, schedule: LogSNRSchedule, steps: int = 10) -> Tensor:
    """Deterministic DDIM (first-order probability flow); returns the state on ``logsnr_max``."""
    lam, alpha, sigma = _coefficients(schedule, steps, z_T)
    z = z_T
    for i in range(steps):
        eps = eps_fn(z, _logsnr_batch(lam[i], z))
        x0 = (z - sigma[i].to(z) * eps) / alpha[i].to(z)
        z = alpha[i + 1].to(z) * x0 + sigma[i + 1].to(z) * eps
    return z


def ancestral(
    eps_fn: EpsFn,
    z_T: Tensor,
    schedule: LogSNRSchedule,
    steps: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Stochastic OU-kernel sampler and its free path-KL bound ``(z, path_kl (N,))`` (§5).

    Step from noisier ``t`` to cleaner ``s``: ``z' = a z + c (s_phi + z) + sqrt(1 - a^2) xi`` with
    ``a = alpha_t / alpha_s``, ``c = 1 - a^2``, ``s_phi = -eps_hat / sigma_t``. The reference chain
    (score ``-z``) is exactly stationary at ``N(0, I)``; both chains start from ``N(0, I)`` and
    share the noise, so ``path_kl = sum ||c (s_phi + z)||^2 / (2 (1 - a^2))`` bounds
    ``KL(law of the returned z || N(0, I))``. The returned ``z`` is the last chain state (not a
    Tweedie-denoised one) so the bound applies to exactly what is returned.
    """
    lam, alpha, sigma = _coefficients(schedule, steps, z_T)
    var_t, var_s = torch.sigmoid(-lam[:-1]), torch.sigmoid(-lam[1:])
    # 1 - a^2 = (sigma_t^2 - sigma_s^2) / alpha_s^2, written so it keeps precision near logsnr_max
    one_minus_a2 = (var_t - var_s) / alpha[1:] ** 2
    a = alpha[:-1] / alpha[1:]
    z = z_T
    path_kl = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for i in range(steps):
        eps = eps_fn(z, _logsnr_batch(lam[i], z))
        c = one_minus_a2[i].to(z)
        drift = c * (z - eps / sigma[i].to(z))  # c (s_phi + z)
        path_kl = path_kl + drift.pow(2).sum(-1) / (2 * c)
        xi = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = a[i].to(z) * z + drift + c.sqrt() * xi
    return z, path_kl


DETERMINISTIC_SAMPLERS: dict[str, Callable[..., Tensor]] = {"dpmpp2m": dpmpp_2m, "ddim": ddim}
SAMPLERS = ("dpmpp2m", "ddim", "ancestral")
