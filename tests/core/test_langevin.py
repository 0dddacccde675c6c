"""The Langevin E-step against ground truth (docs/method.md §3.1, §7, §9)."""

import math

import pytest
import torch

from diffenc_core.errors import DivergenceError
from diffenc_core.langevin import energy, langevin, log_lik_and_grad, refine
from diffenc_core.toys import Bimodal, LinearGaussian

torch.set_num_threads(1)

CHAINS = 4000


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)


@pytest.fixture(scope="module")
def xs(lg):
    x, _ = lg.sample(3, generator=torch.Generator().manual_seed(0))
    return x


def _run_chains(lg, xs, *, beta=1.0, alignment=0.0, anchor=None, seed=1, scale=None):
    """MALA from N(0, I) starts: 150 adapting steps, then 100 at the adapted, frozen step."""
    g = torch.Generator().manual_seed(seed)
    x = xs.repeat_interleave(CHAINS, 0)
    z0 = torch.randn(x.shape[0], 2, generator=g)
    a = None if anchor is None else anchor.repeat_interleave(CHAINS, 0)
    s = None if scale is None else scale.expand(x.shape[0], 2)
    kw = dict(beta=beta, alignment=alignment, z_anchor=a, scale=s, generator=g)
    res = langevin(lg.log_lik, x, z0, math.log(0.01), steps=150, **kw)
    res = langevin(lg.log_lik, x, res.z, res.log_step, steps=100, adapt_rate=0.0, **kw)
    return res.z.view(len(xs), CHAINS, 2)


def _check_gaussian(z, mean, cov):
    sd = cov.diagonal().sqrt()
    for i in range(z.shape[0]):
        emp_mean, emp_cov = z[i].mean(0), torch.cov(z[i].T)
        assert ((emp_mean - mean[i]).abs() / sd).max() < 0.1, (emp_mean, mean[i])
        rel = (emp_cov - cov).abs() / sd.outer(sd)
        assert rel.max() < 0.1, (emp_cov, cov)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_mala_matches_exact_posterior(lg, xs, beta):
    mean, cov = lg.posterior(xs, beta=beta)
    _check_gaussian(_run_chains(lg, xs, beta=beta), mean, cov)


def test_preconditioned_mala_matches_exact_posterior_and_takes_larger_steps(lg, xs):
    """A fixed diagonal preconditioner (the posterior's own scales here, 0.09 and 0.26) keeps the target exact
    and lets one step size fit both directions: the adapted step grows toward the unit scale."""
    mean, cov = lg.posterior(xs)
    scale = cov.diagonal().sqrt()
    _check_gaussian(_run_chains(lg, xs, scale=scale), mean, cov)
    g = torch.Generator().manual_seed(3)
    x = xs.repeat_interleave(64, 0)
    z0 = torch.randn(x.shape[0], 2, generator=g) * scale
    plain = langevin(lg.log_lik, x, z0, math.log(0.01), steps=150, generator=g)
    pre = langevin(lg.log_lik, x, z0, math.log(0.01), steps=150, scale=scale.expand(x.shape[0], 2), generator=g)
    assert pre.log_step.exp().mean() > 20 * plain.log_step.exp().mean()


def test_alignment_target_in_closed_form(lg, xs):
    # the target is N(m, S) times exp(-lam/2 ||z - a||^2): precision P + lam I
    lam = 50.0
    anchor = torch.tensor([[0.5, -0.5], [-0.3, 0.2], [0.0, 0.4]])
    mean, cov = lg.posterior(xs)
    prec = torch.linalg.inv(cov)
    cov_a = torch.linalg.inv(prec + lam * torch.eye(2))
    mean_a = (mean @ prec + lam * anchor) @ cov_a
    _check_gaussian(_run_chains(lg, xs, alignment=lam, anchor=anchor), mean_a, cov_a)


def test_default_anchor_is_z0(lg, xs):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 2, generator=g)
    kw = dict(steps=5, alignment=3.0)
    a = langevin(lg.log_lik, xs, z0, -4.0, generator=torch.Generator().manual_seed(1), **kw)
    b = langevin(lg.log_lik, xs, z0, -4.0, z_anchor=z0, generator=torch.Generator().manual_seed(1),
                 **kw)
    assert torch.equal(a.z, b.z)


@pytest.mark.parametrize("start", [1e-3, 1.0])
def test_acceptance_adapts_to_target(lg, xs, start):
    g = torch.Generator().manual_seed(0)
    x = xs.repeat_interleave(200, 0)
    z0 = torch.randn(x.shape[0], 2, generator=g)
    res = langevin(lg.log_lik, x, z0, math.log(start), steps=150, generator=g)
    res = langevin(lg.log_lik, x, res.z, res.log_step, steps=50, generator=g)
    assert abs(res.accept.mean().item() - 0.574) < 0.1
    # the adapted step is near the scale of the narrowest posterior direction (std 0.09)
    assert 0.002 < res.log_step.exp().median().item() < 0.05


def test_step_cap(lg, xs):
    x = xs.repeat_interleave(50, 0)
    g = torch.Generator().manual_seed(0)
    res = langevin(lg.log_lik, x, torch.zeros(x.shape[0], 2), 0.0, steps=50, step_max=1e-3,
                   generator=g)
    assert res.log_step.max() <= math.log(1e-3) + 1e-6
    assert res.log_step.min() > math.log(1e-3) - 0.5
    assert res.accept.mean() > 0.8  # the cap binds: smaller than the target-acceptance step


def test_ula_diverges_and_e_step_recovers_or_raises(lg, xs):
    x = xs.repeat_interleave(20, 0)
    z0 = torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(0))
    # ULA is stable only for h < 2 / (largest curvature) = 2 * 0.09^2 / (1 - 0.09^2) ~ 0.016
    raw = langevin(lg.log_lik, x, z0, 0.0, steps=20, adjust=False,
                   generator=torch.Generator().manual_seed(1))
    assert not torch.isfinite(raw.z).all()
    assert torch.equal(raw.accept, torch.ones_like(raw.accept))

    with pytest.raises(DivergenceError, match=r"60 of 60 examples .* after 3 retries"):
        refine(lg.log_lik, x, z0, 0.0, steps=20, adjust=False, max_retries=3,
               generator=torch.Generator().manual_seed(1))

    res = refine(lg.log_lik, x, z0, 0.0, steps=20, adjust=False, max_retries=10,
                 generator=torch.Generator().manual_seed(1))
    assert 3 < res.retries <= 10
    assert torch.allclose(res.log_step, torch.full_like(res.log_step, -res.retries * math.log(2)))
    for t in (res.z, res.log_step, res.accept, res.gap, res.move):
        assert torch.isfinite(t).all()


def test_e_step_reruns_only_diverged_examples(lg, xs):
    x = xs.repeat_interleave(10, 0)
    z0 = torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(0))
    log_step = torch.where(torch.arange(x.shape[0]) % 2 == 0, 0.0, math.log(1e-3))
    kw = dict(steps=20, adjust=False)
    plain = langevin(lg.log_lik, x, z0, log_step, generator=torch.Generator().manual_seed(1), **kw)
    good = torch.isfinite(plain.z).all(-1)
    assert good.any() and not good.all()
    res = refine(lg.log_lik, x, z0, log_step, max_retries=10,
                 generator=torch.Generator().manual_seed(1), **kw)
    assert torch.isfinite(res.z).all() and res.retries > 0
    assert torch.equal(res.z[good], plain.z[good])
    assert torch.equal(res.log_step[good], plain.log_step[good])


def test_mala_never_diverges(lg, xs):
    x = xs.repeat_interleave(20, 0)
    z0 = torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(0))
    res = refine(lg.log_lik, x, z0, math.log(1.0), steps=20,
                 generator=torch.Generator().manual_seed(1))
    assert res.retries == 0
    assert torch.isfinite(res.z).all() and torch.isfinite(res.gap).all()


def test_mala_keeps_the_mode_weights_it_starts_with():
    # docs/method.md §9: started in one mode, Langevin never finds the other one
    bm = Bimodal()
    c = torch.tensor(bm.shift)
    roots = torch.tensor([[1.0, 0.3], [-0.9, 0.6], [1.2, -0.5], [0.8, 0.8]])
    x = bm.mean(roots + c)
    mass = bm.mode_masses(x)
    assert ((mass - 0.5).abs() > 0.1).all()  # unequal modes
    # start every chain on the exact minority mode c + s sqrt(x)
    root = torch.sqrt(torch.complex(x[:, 0].double(), x[:, 1].double()))
    sign = torch.where(mass < 0.5, 1.0, -1.0).double()
    start = c + sign[:, None] * torch.stack([root.real, root.imag], -1).float()
    reps = 500
    xr = x.repeat(reps, 1)
    res = langevin(bm.log_lik, xr, start.repeat(reps, 1), math.log(0.01), steps=100,
                   generator=torch.Generator().manual_seed(0))
    frac = (bm.mode_sign(xr, res.z).view(reps, 4) > 0).float().mean(0)
    assert ((frac - mass).abs() > 0.2).all(), (frac, mass)


def test_energy_by_hand(lg, xs):
    z = torch.tensor([[0.1, -0.2], [0.3, 0.0], [-1.0, 0.5]])
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, -0.5]])
    beta, lam = 2.0, 0.7
    resid = xs - z @ lg.W.T - lg.b
    ll = -0.5 * (resid**2).sum(-1) / lg.noise**2 - 4 * math.log(2 * math.pi * lg.noise**2)
    log_prior = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
    want = -ll / beta - log_prior + 0.5 * lam * ((z - a) ** 2).sum(-1)
    got = energy(lg.log_lik, xs, z, z_anchor=a, beta=beta, alignment=lam)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(energy(lg.log_lik, xs, z), -ll - log_prior, rtol=1e-5, atol=1e-4)
    _, grad = log_lik_and_grad(lg.log_lik, xs, z)
    assert torch.allclose(grad, resid @ lg.W / lg.noise**2, rtol=1e-4, atol=1e-3)


def test_gap_and_move_diagnostics(lg, xs):
    z0 = lg.posterior(xs)[0] + torch.tensor([1.0, -1.0])  # far out in a narrow posterior
    res = langevin(lg.log_lik, xs, z0, -5.0, steps=30, alignment=1.0,
                   generator=torch.Generator().manual_seed(1))
    u0 = energy(lg.log_lik, xs, z0, z_anchor=z0, alignment=1.0)
    u1 = energy(lg.log_lik, xs, res.z, z_anchor=z0, alignment=1.0)
    assert torch.allclose(res.gap, u0 - u1, rtol=1e-4, atol=1e-3)
    assert torch.allclose(res.move, (res.z - z0).norm(dim=-1))
    assert (res.gap > 10).all()
    assert not res.z.requires_grad


def _decoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _log_lik(net):
    def log_lik(x, z):
        return -0.5 * ((x - net(z)) ** 2).sum(-1) / 0.01
    return log_lik


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("no_grad", [False, True])
def test_decoder_gets_no_grad(frozen, no_grad):
    net = _decoder().requires_grad_(not frozen)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    z0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(not no_grad):
        res = refine(_log_lik(net), x, z0, math.log(0.01), steps=5,
                     generator=torch.Generator().manual_seed(2))
    assert all(p.grad is None for p in net.parameters())
    assert torch.isfinite(res.z).all() and not res.z.requires_grad
    assert (res.move > 0).any()


def test_deterministic_given_seed(lg, xs):
    z0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))

    def run(adjust):
        return refine(lg.log_lik, xs, z0, math.log(0.01), steps=10, adjust=adjust,
                      generator=torch.Generator().manual_seed(7))

    for adjust in (True, False):
        a, b = run(adjust), run(adjust)
        for name in ("z", "log_step", "accept", "gap", "move"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    other = refine(lg.log_lik, xs, z0, math.log(0.01), steps=10,
                   generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other.z, run(True).z)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(lg, xs):
    dev = torch.device("cuda")
    lg_cuda = LinearGaussian(W=lg.W.to(dev), b=lg.b.to(dev), noise=lg.noise)
    x = xs.to(dev)
    z0 = torch.randn(3, 2, device=dev)

    def run():
        g = torch.Generator(device=dev).manual_seed(0)
        return refine(lg_cuda.log_lik, x, z0, math.log(0.01), steps=10, generator=g)

    a, b = run(), run()
    assert a.z.device.type == "cuda" and a.log_step.device.type == "cuda"
    assert torch.equal(a.z, b.z)
