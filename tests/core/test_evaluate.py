"""Evaluation of a trained run: the bounds on one set of x, AIS log p(x) and each bound's gap to it."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny import tiny

from diffenc_core import config, data, evaluate, trainer
from diffenc_core.config import EncoderConfig, VAEConfig
from diffenc_core.encoder import DiffusionEncoder
from diffenc_core.sampling import dpmpp_2m
from diffenc_core.toys import LinearGaussian
from diffenc_core.vae import gaussian_log_q


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = {}
    for method in ("diffusion", "vae"):
        cfg = config.load(None, tiny(f"data.root={tmp / 'data'}", f"train.runs_dir={tmp / 'runs'}",
                                     f"train.method={method}", "em.vae_steps=10", "eval.ais_n=40"))
        if not (cfg.data.prepared_dir / data.MANIFEST).exists():
            data.prepare(cfg.data)
        out[method] = evaluate.evaluate(cfg, trainer.train(cfg, progress=False))
    return out


@pytest.mark.parametrize("method", ["diffusion", "vae"])
def test_bounds_are_ordered_and_gaps_are_to_the_same_x(evaluated, method):
    m = evaluated[method]
    assert m["n_ais"] == 40 and m["n_test"] == 60
    # IWAE-k and the exact-log-q ELBO come from the same samples of every test x: IWAE is the higher
    assert m["iwae_4_nats"] >= m["elbo_exact_logq_nats"]
    assert m["ais_gap_iwae_4_nats"] <= m["ais_gap_exact_logq_nats"]
    # the ladder check: AIS is a stochastic lower bound that tightens with the ladder, so the 4x
    # longer ladder gives the higher estimate (20 vs 5 temperatures: far from converged here)
    assert m["ais_ladder_change_nats"] > 0
    assert m["ais_log_px_stderr_nats"] > 0 and m["ais_seconds"] > 0
    # checked against the best bound on the same x, the ladder grew (x2 a round, to 4x) until not below it
    assert m["ais_bound"] in m and m[m["ais_bound"]] >= m["elbo_nats"]
    assert m["ais_temperatures"] == 20 * 2 ** (m["ais_rounds"] - 1) <= 80
    assert m["ais_converged"] == (m["ais_minus_bound_nats"] >= -2 * m["ais_minus_bound_se_nats"])
    assert m["ais_converged"] or m["ais_temperatures"] == 80
    if m["ais_rounds"] > 1:  # the previous round is the shorter ladder of the check
        assert m["ais_check_temperatures"] == m["ais_temperatures"] // 2
    assert "sigma_x" in m  # a Gaussian decoder


def test_large_k_iwae_of_the_gaussian_encoders(evaluated):
    """The VAE's encoder and the diffusion encoder's head have a closed-form log q: IWAE-1000 (the
    default ``iwae_k_gaussian``), on the same draws as their ELBO, so never below it."""
    vae, diff = evaluated["vae"], evaluated["diffusion"]
    assert vae["iwae_1000_nats"] >= vae["elbo_exact_logq_nats"]
    assert diff["iwae_base_only_1000_nats"] >= diff["elbo_base_only_nats"]


def test_the_base_only_elbo_is_reported_for_the_diffusion_encoder(evaluated):
    assert "elbo_base_only_nats" in evaluated["diffusion"]
    assert "elbo_base_only_nats" not in evaluated["vae"]


def test_bounds_and_the_check_ladder_on_the_first_x(evaluated, tmp_path):
    """``eval.importance_n`` and ``eval.ais_check_n``: the exact-log-q bounds and the check ladder on the first
    test x, each gap to AIS paired on the x its bound covers; the path ELBO and AIS keep every x."""
    cfg = config.load(None, tiny(f"data.root={tmp_path / 'data'}", f"train.runs_dir={tmp_path / 'runs'}",
                                 "train.method=vae", "eval.ais_n=40", "eval.importance_n=20", "eval.ais_check_n=10"))
    data.prepare(cfg.data)
    m = evaluate.evaluate(cfg, trainer.train(cfg, progress=False))
    assert (m["n_test"], m["n_importance"], m["n_ais"], m["n_ais_check"]) == (60, 20, 40, 10)
    full = evaluated["vae"]
    assert (full["n_importance"], full["n_ais_check"]) == (60, 40)
    assert m["elbo_nats"] == pytest.approx(full["elbo_nats"])  # the closed-form ELBO: every test x, either way
    assert m["elbo_exact_logq_nats"] != pytest.approx(full["elbo_exact_logq_nats"], abs=1e-6)
    assert m["ais_gap_exact_logq_nats"] != pytest.approx(m["ais_log_px_nats"] - m["elbo_exact_logq_nats"], abs=1e-6)


def test_a_bernoulli_decoder_is_evaluated_without_sigma_x(tmp_path):
    """Binary pixels, a Bernoulli decoder: every bound and AIS in nats per image, no observation std."""
    cfg = config.load(None, tiny(f"data.root={tmp_path / 'data'}", f"train.runs_dir={tmp_path / 'runs'}",
                                 "train.method=vae", "data.binarize=fixed", "eval.ais_n=20"))
    data.prepare(cfg.data)
    m = evaluate.evaluate(cfg, trainer.train(cfg, progress=False))
    assert "sigma_x" not in m
    assert m["iwae_1000_nats"] >= m["elbo_exact_logq_nats"] and m["ais_log_px_nats"] < 0


# --------------------------------------------------------------------------- importance sampling
def _exact_posterior_head(toy: LinearGaussian):
    """``x -> (mean, log_std)`` of the toy's exact posterior (diagonal: its W has orthogonal columns)."""

    def head(x):
        mean, cov = toy.posterior(x)
        return mean, cov.diagonal().sqrt().log().expand_as(mean)

    return head


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])
def test_importance_weights_of_the_exact_posterior_are_log_px_in_any_layout(rows):
    """With the exact posterior as proposal every log weight is log p(x): ELBO = IWAE = log p(x)
    exactly, however the 5 x and 9 draws are cut into passes of ``rows``."""
    toy = LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)
    x, _ = toy.sample(5, torch.Generator().manual_seed(3))
    w = evaluate.importance_weights(evaluate.gaussian_proposal(_exact_posterior_head(toy)), toy.log_lik, x, 9, rows)
    assert w.log_joint.shape == w.log_q.shape == w.log_prior.shape == (9, 5)
    torch.testing.assert_close(w.elbo(), toy.log_evidence(x), rtol=0, atol=1e-3)
    torch.testing.assert_close(w.iwae(), toy.log_evidence(x), rtol=0, atol=1e-3)
    torch.testing.assert_close(w.iwae(2), toy.log_evidence(x), rtol=0, atol=1e-3)


def test_importance_weights_of_a_wider_proposal_order_the_bounds():
    """A proposal 1.5x too wide: ELBO < IWAE-2 < IWAE-k <= log p(x), and the ELBO's gap is the exact
    KL(q || posterior) = 2 (s^2/2 - 1/2 - log s) per latent dimension with s = 1.5 (within Monte Carlo)."""
    toy = LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)
    x, _ = toy.sample(200, torch.Generator().manual_seed(3))
    exact = _exact_posterior_head(toy)

    def wide(xb):
        mean, log_std = exact(xb)
        return mean, log_std + math.log(1.5)

    torch.manual_seed(0)
    w = evaluate.importance_weights(evaluate.gaussian_proposal(wide), toy.log_lik, x, 500, 4096)
    log_px = toy.log_evidence(x)
    kl = 2 * (1.5**2 / 2 - 0.5 - math.log(1.5))
    assert (log_px - w.elbo()).mean().item() == pytest.approx(kl, rel=0.05)
    assert w.elbo().mean() < w.iwae(2).mean() < w.iwae().mean() <= log_px.mean()
    assert (log_px - w.iwae()).mean() < 0.01


def test_flow_proposal_keeps_every_draw_with_its_own_x():
    """m draws of 5 different x through the encoder's flow in one batch: each draw's exact log q is its
    own x's closed form (an untrained whitened encoder: q = N(mu, (c std)^2), c the flow's gain)."""
    torch.manual_seed(0)
    enc = DiffusionEncoder(8, 3, EncoderConfig(hidden=16, blocks=1, time_embed_dim=8, x_embed_dim=8, guidance="none"),
                           VAEConfig(hidden=16, depth=1), zero_head=False)
    x = torch.randn(5, 8)
    z, log_q = evaluate.flow_proposal(functools.partial(enc.log_q, steps=10))(x, 4)
    assert z.shape == (4, 5, 3) and log_q.shape == (4, 5)
    with torch.no_grad():
        mu, log_std = enc.head(x)

    def prior_eps(zz, logsnr):
        return enc.schedule.alpha_sigma(logsnr)[1].reshape(-1, 1) * zz

    gain = float(dpmpp_2m(prior_eps, torch.ones(1, 1, dtype=torch.float64), enc.schedule, 10))
    torch.testing.assert_close(log_q, gaussian_log_q(z, mu, log_std + math.log(gain)), rtol=0, atol=1e-4)


def test_an_encoders_own_draws_are_weighted_with_their_joint():
    """An encoder's own draws (``flow_proposal``: one sample and its exact log q per row), in passes of 4
    rows: for the exact posterior, ``log p(x, z) − log q(z|x)`` is ``log p(x)`` at every draw."""
    toy = LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)
    x, _ = toy.sample(6, torch.Generator().manual_seed(3))
    head = _exact_posterior_head(toy)

    def one_draw(xb):
        z, log_q = evaluate.gaussian_proposal(head)(xb, 1)
        return z[0], log_q[0]

    w = evaluate.importance_weights(evaluate.flow_proposal(one_draw), toy.log_lik, x, 5, rows=4)
    assert w.log_joint.shape == w.log_q.shape == w.log_prior.shape == (5, 6)
    torch.testing.assert_close(w.log_joint - w.log_q, toy.log_evidence(x).expand(5, 6), rtol=0, atol=1e-3)
