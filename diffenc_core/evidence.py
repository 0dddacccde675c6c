"""``log p(x)`` by annealed importance sampling: tempered SMC from the prior (docs/method.md §8).

The ELBO and IWAE say how well an *encoder* explains ``x``; this says how good the *decoder* is as
a density model, independently of any encoder, so ``log p(x) − ELBO`` is the encoder's own gap.
Particles start exactly at the prior and are carried to the posterior by reweighting, resampling
and MALA moves (``smc.tempered_smc`` at β = 1); the product of mean incremental weights is an
unbiased estimate of ``p(x)``, so its log is a stochastic lower bound that tightens with the ladder.

An AIS estimate below another lower bound on the same x (an IWAE, an ELBO) by more than their
paired noise is under-converged: ``ais_until_converged`` doubles the ladder until it is not (and,
optionally, until it stops rising from the previous ladder), or until a cap, and says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffenc_core.langevin import LogLik
from diffenc_core.smc import tempered_smc

# AIS counts as below a bound when their paired mean difference is under -NOISE_SE standard errors
NOISE_SE = 2.0


@dataclass(frozen=True)
class AISSettings:
    """The ladder and particle budget of one AIS estimate."""

    temperatures: int = 400
    particles: int = 16
    moves: int = 2
    step_size: float = 0.05
    batch_size: int = 64


def ais_log_px(
    log_lik: LogLik,
    x: Tensor,
    z_dim: int,
    settings: AISSettings = AISSettings(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(N,)`` AIS estimates of ``log ∫ p(z) p(x|z) dz`` in nats, ``settings.batch_size`` x at a time.

    ``log_lik(x, z)`` is the decoder's ``log p(x|z)``; it is differentiated with respect to ``z``
    only, so a decoder's parameters are never touched.
    """
    out = []
    for i in range(0, x.shape[0], settings.batch_size):
        res = tempered_smc(
            log_lik, x[i : i + settings.batch_size], z_dim=z_dim, beta=1.0,
            particles=settings.particles, temperatures=settings.temperatures, moves=settings.moves,
            step_size=settings.step_size, generator=generator,
        )
        out.append(res.log_evidence)
    return torch.cat(out)


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean of ``a − b`` over the same x and its standard error (0 for a single x)."""
    diff = (a - b).double()
    se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else 0.0
    return float(diff.mean()), se


def is_below(log_px: Tensor, bound: Tensor) -> bool:
    """Whether AIS lies below ``bound`` (a lower bound on the same x) beyond their paired noise."""
    mean, se = paired_difference(log_px, bound)
    return mean < -NOISE_SE * se


@dataclass(frozen=True)
class AISResult:
    """An AIS estimate and how it was reached; the bound figures are ``None`` without a bound."""

    log_px: Tensor  # (N,) at the final ladder
    temperatures: int  # the final ladder
    shorter: Tensor | None  # the previous round's (half) ladder (N,), or the check ladder's (its x); None: neither
    shorter_temperatures: int
    rounds: int  # ladders run, the check ladder not counted
    minus_bound_nats: float | None  # mean(AIS − bound) at the final ladder
    minus_bound_se_nats: float | None
    converged: bool  # not below the bound, and (with a ladder tolerance) no longer rising beyond it


def _settled(log_px: Tensor, bound: Tensor | None, shorter: Tensor | None, ladder_tolerance: float) -> bool:
    """Not below ``bound`` beyond the noise and, with a tolerance, risen from the shorter ladder by at
    most ``ladder_tolerance`` on average (not discounted by the noise: a noisy rise is no evidence of
    convergence). ``bound`` and ``shorter`` may cover only the first of the x: each is paired on its own."""
    if bound is not None and is_below(log_px[: bound.shape[0]], bound):
        return False
    if ladder_tolerance > 0 and shorter is not None:
        return paired_difference(log_px[: shorter.shape[0]], shorter)[0] <= ladder_tolerance
    return True


def ais_until_converged(
    log_lik: LogLik,
    x: Tensor,
    z_dim: int,
    settings: AISSettings,
    bound: Tensor | None,
    max_temperatures: int,
    generator: torch.Generator | None = None,
    check_temperatures: int = 0,
    ladder_tolerance: float = 0.0,
    check_n: int | None = None,
) -> AISResult:
    """AIS on ``x``, the ladder doubled (capped at ``max_temperatures``) until it has settled.

    ``bound`` is the best other lower bound on ``log p(x)`` for the same x, or for the first of them (e.g. an
    IWAE): a converged AIS is not below it. A proposal's IWAE can sit a nat or more below ``log p(x)``
    (docs/method.md §8), so a ``ladder_tolerance`` > 0 also asks that the estimate rose by at most that much
    (nats) from the previous, shorter ladder: the ``check_temperatures`` ladder first (on the first ``check_n`` x, all
    by default: it only says how stable the estimate is), then the previous round.
    Every round reruns all x with a fresh ladder.
    """
    temps = settings.temperatures
    log_px = ais_log_px(log_lik, x, z_dim, settings, generator)
    shorter, shorter_temps, rounds = None, 0, 1
    if check_temperatures > 0:
        shorter_temps = check_temperatures
        shorter = ais_log_px(log_lik, x[:check_n], z_dim, replace(settings, temperatures=check_temperatures),
                             generator)
    while not _settled(log_px, bound, shorter, ladder_tolerance) and temps < max_temperatures:
        shorter, shorter_temps = log_px, temps
        temps = min(2 * temps, max_temperatures)
        log_px = ais_log_px(log_lik, x, z_dim, replace(settings, temperatures=temps), generator)
        rounds += 1
    converged = _settled(log_px, bound, shorter, ladder_tolerance)
    if bound is None:
        return AISResult(log_px, temps, shorter, shorter_temps, rounds, None, None, converged)
    mean, se = paired_difference(log_px[: bound.shape[0]], bound)
    return AISResult(log_px, temps, shorter, shorter_temps, rounds, mean, se, converged)
