"""Rate estimators against the exact KL of the linear-Gaussian toy (docs/method.md §5, §7, §9).

Fed the exact diffused score, each estimator must land within 5 % of the exact
``KL(posterior || N(0, I))`` (3.76 nats averaged over these x). Measured with 4000 x:

* score_integral, 16 / 32 / 64 strata: -0.2 % / -0.7 % / +0.2 %  (tested at 32).
* ancestral path bound, 200 / 400 / 1000 steps: +0.8..3.6 % / +1.2..2.4 % / -1.7..+0.5 %
  (Monte-Carlo standard error ~0.9 %; tested at 400).
* exact log q through the dpmpp2m Jacobian, 10 / 20 / 40 steps: -1.7 % / -0.7 % / -0.6 %
  (ddim: +13 % / +6.5 % / +2.8 %); tested dpmpp2m at 20.
"""

from __future__ import annotations

import math

import pytest
import torch
from exact import exact_eps_fn, linear_gaussian_case

from diffenc_core.rate import (
    exact_rate_from_log_q,
    log_q_deterministic,
    path_bound,
    score_integral,
    std_normal_log_prob,
)
from diffenc_core.sampling import DETERMINISTIC_SAMPLERS, ancestral, dpmpp_2m
from diffenc_core.schedule import LogSNRSchedule
from diffenc_core.toys import LinearGaussian

torch.set_num_threads(1)

N = 4000


@pytest.fixture(scope="module")
def setup():
    toy, x, schedule, eps_fn = linear_gaussian_case(N)
    return toy, x, schedule, eps_fn, toy.kl_to_prior(x)


def gaussian_kl_to_prior(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    d = cov.shape[-1]
    return 0.5 * (torch.trace(cov) + (mean**2).sum(-1) - d - torch.logdet(cov))


def ancestral_law(toy, x, schedule, steps):
    """Exact law of the ancestral sampler's output under the exact score, and its exact expected
    path KL: with a Gaussian posterior each step ``z' = a z + c (s + z) + sqrt(c) xi`` is affine."""
    mean_post, cov_post = (t.double() for t in toy.posterior(x))
    d = cov_post.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    lam = schedule.grid(steps, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(lam)
    mu, cov = torch.zeros_like(mean_post), eye.clone()
    path = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(steps):
        a = alpha[i] / alpha[i + 1]
        c = 1 - a**2
        prec = torch.linalg.inv(alpha[i] ** 2 * cov_post + sigma[i] ** 2 * eye)
        # s + z = (I - P) z + alpha P m  =: A z + b
        A, b = eye - prec, alpha[i] * mean_post @ prec.T
        drift_mean = mu @ A.T + b
        path += c * ((drift_mean**2).sum(-1) + torch.trace(A @ cov @ A.T)) / 2
        M = a * eye + c * A
        mu, cov = mu @ M.T + c * b, M @ cov @ M.T + c * eye
    return mu, cov, path


def test_score_integral_matches_exact_kl(setup):
    toy, x, schedule, eps_fn, kl = setup
    g = torch.Generator().manual_seed(1)
    mean, cov = toy.posterior(x)
    z0 = mean + torch.randn(N, 2, generator=g) @ torch.linalg.cholesky(cov).T
    est = score_integral(eps_fn, z0, schedule, n_logsnr=32, generator=g)
    assert est.shape == (N,)
    assert abs(est.mean() / kl.mean() - 1) < 0.05


def test_path_bound_matches_exact_kl_and_bounds_it(setup):
    toy, x, schedule, eps_fn, kl = setup
    z, bound = path_bound(
        eps_fn, N, 2, schedule, steps=400, generator=torch.Generator().manual_seed(2)
    )
    assert z.shape == (N, 2) and bound.shape == (N,)
    assert abs(bound.mean() / kl.mean() - 1) < 0.05
    se = (bound - kl).std() / math.sqrt(N)
    assert bound.mean() >= kl.mean() - 3 * se


@pytest.mark.parametrize("steps", [10, 30])
def test_path_bound_upper_bounds_the_sampler_rate(setup, steps):
    """At few steps the sampler's own law differs from the posterior; the bound holds for it."""
    toy, x, schedule, eps_fn, _ = setup
    g = torch.Generator().manual_seed(3)
    z, bound = ancestral(eps_fn, torch.randn(N, 2, generator=g), schedule, steps, g)
    mu, cov, exact_path = ancestral_law(toy, x, schedule, steps)
    sampler_kl = gaussian_kl_to_prior(mu, cov)
    # the Monte-Carlo path KL estimates exactly the path-space KL ...
    se = (bound.double() - exact_path).std() / math.sqrt(N)
    assert abs(bound.double().mean() - exact_path.mean()) < 4 * se
    # ... which is at least the KL of the returned z's law
    assert (exact_path >= sampler_kl - 1e-9).all()
    assert bound.double().mean() >= sampler_kl.mean() - 3 * se
    # and z has the law we propagated exactly
    assert ((z.double() - mu).mean(0).abs() < 4 * cov.diagonal().sqrt() / math.sqrt(N)).all()


def test_log_q_jacobian_matches_exact_kl(setup):
    toy, x, schedule, eps_fn, kl = setup
    z_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(4))
    z, log_q = log_q_deterministic(eps_fn, z_T, schedule, steps=20, sampler="dpmpp2m")
    rate = exact_rate_from_log_q(z, log_q)
    assert rate.shape == (N,) and not z.requires_grad and not log_q.requires_grad
    assert abs(rate.mean() / kl.mean() - 1) < 0.05


def test_log_q_equals_affine_change_of_variables(setup):
    """With the exact score the sampler is affine in z_T; its matrix by finite differences gives
    the density exactly (float64)."""
    toy, x, schedule, _, _ = setup
    x1 = x[:1].double()
    eps_fn = exact_eps_fn(toy, x1.float(), schedule)

    def eps64(z, logsnr):
        return eps_fn(z.float(), logsnr.float()).double()

    origin = dpmpp_2m(eps64, torch.zeros(1, 2, dtype=torch.float64), schedule, 10)
    cols = [
        dpmpp_2m(eps64, e[None], schedule, 10) - origin for e in torch.eye(2, dtype=torch.float64)
    ]
    J = torch.cat(cols).T
    z_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z, log_q = log_q_deterministic(eps64, z_T, schedule, steps=10)
    torch.testing.assert_close(z, origin + z_T @ J.T, rtol=1e-4, atol=1e-5)
    expected = std_normal_log_prob(z_T) - torch.logdet(J)
    torch.testing.assert_close(log_q, expected, rtol=1e-4, atol=1e-4)


def test_exact_rate_from_log_q_is_the_log_ratio():
    z = torch.randn(7, 3)
    log_q = torch.randn(7)
    torch.testing.assert_close(exact_rate_from_log_q(z, log_q), log_q - std_normal_log_prob(z))


@pytest.mark.parametrize("sampler", ["dpmpp2m", "ddim"])
def test_log_q_is_the_affine_flows_density_at_d50(sampler):
    """d = 50, float64: with the exact score of a linear-Gaussian posterior every solver step is
    affine, so ``z = A z_T + b`` with ``A`` (a full matrix: the posterior here is correlated) by
    finite differences, and ``q = N(b, A A^T)`` in closed form. The Jacobian's log-det and the rows'
    independence (one x per row, 6 different x) are checked to float64 precision."""
    d = 50
    toy = LinearGaussian.from_posterior_std(80, torch.linspace(0.05, 0.9, d).tolist(), 0.1, seed=1)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2)))
    toy = LinearGaussian(W=toy.W @ rot, b=toy.b, noise=toy.noise)  # correlated posterior
    schedule = LogSNRSchedule()
    x, _ = toy.sample(6, torch.Generator().manual_seed(3))
    x = x.double()
    eps_fn = exact_eps_fn(toy, x, schedule)
    flow = DETERMINISTIC_SAMPLERS[sampler]
    b = flow(eps_fn, torch.zeros(6, d, dtype=torch.float64), schedule, 10)
    cols = [flow(eps_fn, e.expand(6, d), schedule, 10) - b for e in torch.eye(d, dtype=torch.float64)]
    A = torch.stack(cols, dim=-1)  # (6, d_out, d_in)
    assert (A - A.diagonal(dim1=1, dim2=2).diag_embed()).abs().max() > 1e-2, "a full Jacobian"
    z_T = torch.randn(6, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z, log_q = log_q_deterministic(eps_fn, z_T, schedule, steps=10, sampler=sampler)
    torch.testing.assert_close(z, b + (A @ z_T.unsqueeze(-1)).squeeze(-1), rtol=1e-9, atol=1e-9)
    closed = torch.distributions.MultivariateNormal(b, scale_tril=torch.linalg.cholesky(A @ A.mT)).log_prob(z)
    torch.testing.assert_close(log_q, closed, rtol=1e-8, atol=1e-7)
