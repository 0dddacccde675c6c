"""``log p(x)`` by annealed importance sampling: tempered SMC from the prior (docs/method.md §10).

The ELBO and IWAE say how well an *encoder* explains ``x``; this says how good the *decoder* is as
a density model, independently of any encoder, so ``log p(x) − ELBO`` is the encoder's own gap.
Particles start exactly at the prior and are carried to the posterior by reweighting, resampling
and MALA moves (``smc.tempered_smc`` at β = 1); the product of mean incremental weights is an
unbiased estimate of ``p(x)``, so its log is a stochastic lower bound that tightens with the ladder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffenc_core.langevin import LogLik
from diffenc_core.smc import tempered_smc


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
