"""The E-step: Langevin sampling of ``q*_beta(z|x) ∝ p(z) p(x|z)^(1/beta)`` (docs/method.md §3.1).

Knows nothing about networks: it takes ``log_lik(x, z) -> (N,)`` (nats per example) and
differentiates it with respect to ``z`` only, so a frozen decoder's ``.grad`` is never touched.
MALA (the default) adapts a per-example step size toward a target acceptance rate; ULA is kept
for comparison and can diverge, which ``refine`` catches by retrying with halved steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffenc_core.errors import DivergenceError

LogLik = Callable[[Tensor, Tensor], Tensor]
LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class EStepResult:
    """What one E-step returns, per example; everything detached."""

    z: Tensor  # (N, d) z*
    log_lik: Tensor  # (N,) log p(x|z*)
    log_step: Tensor  # (N,) adapted log step size, to persist per example across epochs
    accept: Tensor  # (N,) mean MH acceptance probability over the steps (1.0 for ULA)
    gap: Tensor  # (N,) U(z0) - U(z*): the synchronisation gap
    move: Tensor  # (N,) ||z* - z0||
    retries: int = 0  # how many times diverged examples were rerun with halved steps


def _potential(
    ll: Tensor, grad_ll: Tensor, z: Tensor, z_anchor: Tensor | None, beta: float, alignment: float
) -> tuple[Tensor, Tensor]:
    """``U`` and ``∇U`` from the log-likelihood and its gradient at ``z`` (docs/method.md §3.1)."""
    u = -ll / beta + 0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)
    g = -grad_ll / beta + z
    if alignment > 0.0 and z_anchor is not None:
        diff = z - z_anchor
        u = u + 0.5 * alignment * diff.pow(2).sum(-1)
        g = g + alignment * diff
    return u, g


def energy(
    log_lik: LogLik,
    x: Tensor,
    z: Tensor,
    z_anchor: Tensor | None = None,
    beta: float = 1.0,
    alignment: float = 0.0,
) -> Tensor:
    """``U(z) = -(1/beta) log p(x|z) - log p(z) + (alignment/2) ||z - z_anchor||^2``, ``(N,)``.

    ``p(z) = N(0, I)`` with its normalising constant, so at ``beta=1, alignment=0`` ``-U`` is
    the log joint. No alignment term without an anchor.
    """
    ll = log_lik(x, z)
    u, _ = _potential(ll, torch.zeros_like(z), z, z_anchor, beta, alignment)
    return u


def log_lik_and_grad(log_lik: LogLik, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``log p(x|z)`` and its gradient with respect to ``z`` only, both detached.

    Works under an outer ``torch.no_grad()`` and whether or not the decoder's parameters
    require grad; ``torch.autograd.grad(inputs=z)`` leaves every parameter's ``.grad`` alone.
    """
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        ll = log_lik(x, zr)
        (grad,) = torch.autograd.grad(ll.sum(), inputs=zr, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(zr)
    return ll.detach(), grad.detach()


def mala_step(
    log_lik: LogLik,
    x: Tensor,
    z: Tensor,
    ll: Tensor,
    grad_ll: Tensor,
    log_step: Tensor,
    *,
    beta: float = 1.0,
    alignment: float = 0.0,
    z_anchor: Tensor | None = None,
    adjust: bool = True,
    scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One MALA (``adjust=True``) or ULA step on ``U``; the chain state is ``(z, ll, grad_ll)``.

    The state carries the log-likelihood rather than ``U`` so a tempered sampler can reuse it
    at a new ``beta`` without a new decoder pass. ``scale`` ``(N, d)`` preconditions the step with a
    fixed diagonal ``S = diag(scale^2)`` (the proposal ``N(z - h S ∇U, 2h S)``: MALA in ``u = z / scale``),
    so a posterior far narrower in some directions than in others mixes at one step size. Returns the new
    state and the per-example acceptance probability (1 for ULA). A proposal with non-finite energy or
    gradient is rejected, so MALA never leaves finite territory.
    """
    h = log_step.exp().unsqueeze(-1)
    s2 = scale.pow(2) if scale is not None else torch.ones_like(z)
    u, g = _potential(ll, grad_ll, z, z_anchor, beta, alignment)
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    zp = z - h * s2 * g + torch.sqrt(2.0 * h * s2) * noise
    llp, gllp = log_lik_and_grad(log_lik, x, zp)
    if not adjust:
        return zp, llp, gllp, torch.ones_like(ll)
    up, gp = _potential(llp, gllp, zp, z_anchor, beta, alignment)
    # log q(z|z') - log q(z'|z) for q(b|a) = N(b; a - h S ∇U(a), 2h S)
    log_fwd = -((zp - z + h * s2 * g).pow(2) / s2).sum(-1) / (4.0 * h.squeeze(-1))
    log_bwd = -((z - zp + h * s2 * gp).pow(2) / s2).sum(-1) / (4.0 * h.squeeze(-1))
    log_alpha = u - up + log_bwd - log_fwd
    finite = torch.isfinite(up) & torch.isfinite(gp).all(-1) & ~torch.isnan(log_alpha)
    log_alpha = torch.where(finite, log_alpha, torch.full_like(log_alpha, -math.inf))
    uniform = torch.rand(ll.shape, generator=generator, device=z.device, dtype=z.dtype)
    take = torch.log(uniform) < log_alpha
    z = torch.where(take.unsqueeze(-1), zp, z)
    ll = torch.where(take, llp, ll)
    grad_ll = torch.where(take.unsqueeze(-1), gllp, grad_ll)
    return z, ll, grad_ll, log_alpha.clamp(max=0.0).exp()


def adapt_log_step(
    log_step: Tensor,
    accept: Tensor,
    *,
    target_accept: float = 0.574,
    adapt_rate: float = 0.1,
    step_max: float = 1.0,
) -> Tensor:
    """``log h += rate * (acc - target)``, capped at ``log(step_max)`` (docs/method.md §9)."""
    return (log_step + adapt_rate * (accept - target_accept)).clamp(max=math.log(step_max))


def langevin(
    log_lik: LogLik,
    x: Tensor,
    z0: Tensor,
    log_step: Tensor | float,
    *,
    steps: int = 20,
    beta: float = 1.0,
    alignment: float = 0.0,
    z_anchor: Tensor | None = None,
    adjust: bool = True,
    target_accept: float = 0.574,
    adapt_rate: float = 0.1,
    step_max: float = 1.0,
    scale: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EStepResult:
    """``steps`` of MALA (or ULA) from ``z0`` with per-example step ``exp(log_step)`` (preconditioned by
    ``scale``, see :func:`mala_step`).

    The step is capped at ``step_max``. MALA adapts it after every step; ULA neither corrects
    nor adapts, and may return non-finite values (``refine`` is the guarded version).
    ``z_anchor`` defaults to ``z0``: the alignment term keeps ``z*`` near the encoder's sample.
    """
    z0 = z0.detach()
    n = z0.shape[0]
    log_step = torch.as_tensor(log_step, dtype=z0.dtype, device=z0.device).detach()
    log_step = log_step.expand(n).clamp(max=math.log(step_max))
    z_anchor = z0 if z_anchor is None else z_anchor.detach()
    ll, grad_ll = log_lik_and_grad(log_lik, x, z0)
    u0, _ = _potential(ll, grad_ll, z0, z_anchor, beta, alignment)
    z = z0
    acc_sum = torch.zeros_like(log_step)
    for _ in range(steps):
        z, ll, grad_ll, acc = mala_step(
            log_lik, x, z, ll, grad_ll, log_step, beta=beta, alignment=alignment,
            z_anchor=z_anchor, adjust=adjust, scale=scale, generator=generator,
        )
        acc_sum = acc_sum + acc
        if adjust:
            log_step = adapt_log_step(
                log_step, acc, target_accept=target_accept, adapt_rate=adapt_rate,
                step_max=step_max,
            )
    u, _ = _potential(ll, grad_ll, z, z_anchor, beta, alignment)
    accept = acc_sum / steps if steps > 0 else torch.ones_like(log_step)
    return EStepResult(
        z=z, log_lik=ll, log_step=log_step, accept=accept, gap=u0 - u, move=(z - z0).norm(dim=-1), retries=0
    )


def _take(t: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if t is None else t[idx]


def refine(
    log_lik: LogLik,
    x: Tensor,
    z0: Tensor,
    log_step: Tensor | float,
    *,
    max_retries: int = 3,
    **kw,
) -> EStepResult:
    """``langevin`` that never returns non-finite values.

    Examples whose ``z*`` or energy come out non-finite are rerun from ``z0`` with half the
    step, up to ``max_retries`` times; then ``DivergenceError``. Only those examples are rerun
    (``log_lik`` is per example), so finite results are kept as they were.
    """
    z0 = z0.detach()
    n = z0.shape[0]
    log_step = torch.as_tensor(log_step, dtype=z0.dtype, device=z0.device).detach()
    z_anchor, scale = kw.pop("z_anchor", None), kw.pop("scale", None)
    start = log_step.expand(n).clamp(max=math.log(kw.get("step_max", 1.0)))
    res = langevin(log_lik, x, z0, start, z_anchor=z_anchor, scale=scale, **kw)
    retries = 0
    while True:
        bad = ~(torch.isfinite(res.z).all(-1) & torch.isfinite(res.gap))
        if not bad.any():
            res.retries = retries
            return res
        idx = bad.nonzero().squeeze(-1)
        if retries == max_retries:
            h = start[idx].exp().max().item()
            raise DivergenceError(
                f"E-step diverged: {idx.numel()} of {n} examples still non-finite after "
                f"{max_retries} retries with halved steps (last step size {h:.3g}); lower "
                "em.step_size / em.step_size_max, or set em.e_step 'mala' (Metropolis-adjusted)"
            )
        retries += 1
        start = start.clone()
        start[idx] = start[idx] - math.log(2.0)
        sub = langevin(log_lik, x[idx], z0[idx], start[idx], z_anchor=_take(z_anchor, idx), scale=_take(scale, idx),
                       **kw)
        for name in ("z", "log_lik", "log_step", "accept", "gap", "move"):
            merged = getattr(res, name).clone()
            merged[idx] = getattr(sub, name)
            setattr(res, name, merged)

