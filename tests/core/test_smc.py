"""The tempered-SMC E-step against ground truth (docs/method.md §7, §9)."""

import math

import pytest
import torch

from diffenc_core.smc import systematic_resample, temperature_ladder, tempered_smc
from diffenc_core.toys import Bimodal, LinearGaussian

torch.set_num_threads(1)

RUNS = 2000  # independent SMC runs per x


@pytest.fixture(scope="module")
def bimodal():
    """Four x whose two posterior modes are far apart (roots c ± r, |r| > 1) and unequal."""
    bm = Bimodal()
    roots = torch.tensor([[1.0, 0.3], [-0.9, 0.6], [1.2, -0.5], [0.8, 0.8]])
    x = bm.mean(roots + torch.tensor(bm.shift))
    mass = bm.mode_masses(x)
    assert ((mass - 0.5).abs() > 0.1).all()
    xr = x.repeat(RUNS, 1)
    res = tempered_smc(bm.log_lik, xr, z_dim=2, generator=torch.Generator().manual_seed(0))
    return bm, x, mass, xr, res


def test_smc_recovers_mode_masses(bimodal):
    bm, x, mass, xr, res = bimodal
    frac = (bm.mode_sign(xr, res.z).view(RUNS, len(x)) > 0).float().mean(0)
    assert ((frac - mass).abs() < 0.05).all(), (frac, mass)


def test_smc_evidence_bimodal(bimodal):
    bm, x, _, _, res = bimodal
    exact = bm.log_evidence(x)
    log_z = res.log_evidence.view(RUNS, len(x))
    # the SMC evidence is unbiased in Z: average it as Z, not log Z
    assert ((torch.logsumexp(log_z, 0) - math.log(RUNS) - exact).abs() < 0.1).all()
    # log Z-hat is low by about half its variance (Jensen), with 8 particles ~0.15 nats
    bias = log_z.mean(0) - exact
    assert ((bias > -0.3) & (bias < 0.05)).all(), bias


def test_result_invariants(bimodal):
    _, x, _, xr, res = bimodal
    n = xr.shape[0]
    assert res.particles.shape == (8, n, 2) and res.z.shape == (n, 2)
    assert res.log_weights.shape == (8, n)
    assert torch.allclose(torch.logsumexp(res.log_weights, 0), torch.zeros(n), atol=1e-5)
    assert ((res.ess > 0) & (res.ess <= 1 + 1e-6)).all()
    assert ((res.accept >= 0) & (res.accept <= 1)).all()
    assert 0.5 < res.accept.mean() < 0.95
    # the draw is one of its particles
    assert ((res.particles - res.z).abs().sum(-1) == 0).any(0).all()
    for t in (res.z, res.log_evidence, res.log_weights):
        assert torch.isfinite(t).all()


def _lg_log_evidence(lg, x, beta):
    """``log ∫ p(z) p(x|z)^(1/beta) dz``: ``p^(1/beta)`` is ``N(x; Wz + b, beta s^2)`` times a
    constant."""
    d = lg.x_dim
    W, s2 = lg.W.double(), lg.noise**2
    cov = W @ W.T + beta * s2 * torch.eye(d, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(lg.b.double(), covariance_matrix=cov)
    const = 0.5 * d * (math.log(2 * math.pi * beta * s2) - math.log(2 * math.pi * s2) / beta)
    return dist.log_prob(x.double()) + const


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_smc_linear_gaussian(beta):
    lg = LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)
    x, _ = lg.sample(3, generator=torch.Generator().manual_seed(0))
    if beta == 1.0:
        assert torch.allclose(_lg_log_evidence(lg, x, 1.0), lg.log_evidence(x).double(), atol=1e-4)
    res = tempered_smc(lg.log_lik, x.repeat(RUNS, 1), z_dim=2, beta=beta,
                       generator=torch.Generator().manual_seed(1))
    log_z = res.log_evidence.view(RUNS, 3).double()
    exact = _lg_log_evidence(lg, x, beta)
    assert ((torch.logsumexp(log_z, 0) - math.log(RUNS) - exact).abs() < 0.1).all()
    mean, cov = lg.posterior(x, beta=beta)
    z = res.z.view(RUNS, 3, 2)
    sd = cov.diagonal().sqrt()
    for i in range(3):
        assert ((z[:, i].mean(0) - mean[i]).abs() / sd).max() < 0.1
        assert ((torch.cov(z[:, i].T) - cov).abs() / sd.outer(sd)).max() < 0.15


def test_deterministic_given_seed():
    bm = Bimodal()
    x, _ = bm.sample(16, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return tempered_smc(bm.log_lik, x, z_dim=2, temperatures=6,
                            generator=torch.Generator().manual_seed(seed))

    a, b = run(3), run(3)
    for name in ("z", "particles", "log_weights", "log_evidence", "ess", "accept"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.particles, run(4).particles)


def test_decoder_gets_no_grad():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def log_lik(x, z):
        return -0.5 * ((x - net(z)) ** 2).sum(-1) / 0.01

    with torch.no_grad():
        res = tempered_smc(log_lik, x, z_dim=2, temperatures=4,
                           generator=torch.Generator().manual_seed(0))
    res = tempered_smc(log_lik, x, z_dim=2, temperatures=4,
                       generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in net.parameters())
    assert torch.isfinite(res.z).all() and not res.z.requires_grad


def test_temperature_ladder():
    for taus in (temperature_ladder(24), temperature_ladder(24, tau_min=1e-3)):
        assert taus.shape == (25,) and taus[0] == 0 and taus[-1] == 1
        assert (taus.diff() > 0).all()
    assert temperature_ladder(24)[1] < 1e-4  # fine near 0 (linear would be 1/24)
    assert torch.allclose(temperature_ladder(3, tau_min=0.01), torch.tensor([0, 0.01, 0.1, 1.0],
                                                                           dtype=torch.float64))


def test_systematic_resample():
    log_w = torch.log(torch.tensor([[0.0, 0.5], [1.0, 0.25], [0.0, 0.25], [0.0, 0.0]]))
    idx = systematic_resample(log_w, torch.Generator().manual_seed(0))
    assert idx.shape == (4, 2)
    assert (idx[:, 0] == 1).all()
    assert sorted(idx[:, 1].tolist()) == [0, 0, 1, 2]  # systematic: counts are exact here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    bm = Bimodal()
    x = bm.sample(64, generator=torch.Generator().manual_seed(0))[0].cuda()

    def run():
        g = torch.Generator(device="cuda").manual_seed(0)
        return tempered_smc(bm.log_lik, x, z_dim=2, generator=g)

    a, b = run(), run()
    assert a.z.device.type == "cuda" and torch.equal(a.z, b.z)
    assert torch.isfinite(a.log_evidence).all()
