"""AIS and its convergence rule: the ladder grows while AIS is below another lower bound on the same
x (docs/method.md §8), checked against exact log p(x) (linear-Gaussian: closed form; bimodal, d = 2:
quadrature)."""

from __future__ import annotations

import pytest
import torch

from diffenc_core.evidence import AISSettings, ais_until_converged, is_below, paired_difference
from diffenc_core.toys import Bimodal, LinearGaussian

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def linear_gaussian():
    toy = LinearGaussian.from_posterior_std(8, [0.09, 0.26], 0.1, seed=0)
    x, _ = toy.sample(64, torch.Generator().manual_seed(0))
    return toy, x, toy.log_evidence(x)


def test_paired_difference_and_noise():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, se = paired_difference(a, a - 0.5 + torch.tensor([0.1, -0.1, 0.1, -0.1]))
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.2 / 3**0.5 / 2, rel=1e-5)
    noisy = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.5])
    assert not is_below(noisy - 0.1, torch.zeros(5))  # 0.1 below, within 2 standard errors
    assert is_below(torch.full((5,), -0.1), torch.zeros(5))  # 0.1 below with no noise at all
    assert not is_below(torch.tensor([-1.0]), torch.tensor([-1.0]))


def test_ladder_grows_to_the_cap_below_an_unreachable_bound(linear_gaussian):
    toy, x, log_px = linear_gaussian
    settings = AISSettings(temperatures=4, particles=4, moves=1)
    res = ais_until_converged(toy.log_lik, x, 2, settings, log_px + 5.0, 32, torch.Generator().manual_seed(7))
    assert (res.temperatures, res.rounds, res.shorter_temperatures) == (32, 4, 16)  # 4, 8, 16, 32
    assert res.converged is False and res.minus_bound_nats < -4.0
    assert res.shorter is not None and res.shorter.shape == log_px.shape


def test_ladder_stays_when_no_bound_is_above(linear_gaussian):
    toy, x, log_px = linear_gaussian
    settings = AISSettings(temperatures=4, particles=4, moves=1)
    gen = torch.Generator().manual_seed(7)
    res = ais_until_converged(toy.log_lik, x, 2, settings, log_px - 50.0, 32, gen)
    assert (res.temperatures, res.rounds, res.shorter) == (4, 1, None) and res.converged is True
    free = ais_until_converged(toy.log_lik, x, 2, settings, None, 32, gen)
    assert (free.rounds, free.converged, free.minus_bound_nats, free.shorter) == (1, True, None, None)
    checked = ais_until_converged(toy.log_lik, x, 2, settings, log_px - 50.0, 32, gen, check_temperatures=2)
    assert (checked.rounds, checked.shorter_temperatures) == (1, 2) and checked.shorter is not None


def test_the_check_ladder_and_the_bound_may_cover_only_the_first_x(linear_gaussian):
    """A stability figure paired on fewer x (``check_n``), a bound on fewer x (``eval.importance_n``): each is
    compared with AIS on its own x, so a bound far above on those x still grows the ladder."""
    toy, x, log_px = linear_gaussian
    settings = AISSettings(temperatures=4, particles=4, moves=1)
    gen = torch.Generator().manual_seed(7)
    res = ais_until_converged(toy.log_lik, x, 2, settings, log_px[:10] - 50.0, 32, gen, check_temperatures=2,
                              check_n=10)
    assert res.log_px.shape == log_px.shape and res.shorter.shape == (10,) and res.converged is True
    grown = ais_until_converged(toy.log_lik, x, 2, settings, log_px[:10] + 5.0, 8, gen, check_temperatures=2,
                                check_n=10)
    assert (grown.temperatures, grown.converged) == (8, False) and grown.shorter.shape == log_px.shape


def test_a_ladder_tolerance_grows_the_ladder_until_it_stops_rising(linear_gaussian):
    """With no bound above it, a short ladder counts as converged by the bound rule alone; a ladder
    tolerance also asks that it rose by at most that much from the previous ladder. Measured (64 x):
    7 rounds (4 -> 256 temperatures), last change −0.05 ± 0.04, AIS − exact from −1.19 to −0.03."""
    toy, x, log_px = linear_gaussian
    settings = AISSettings(temperatures=4, particles=16, moves=1)

    def run(tolerance):
        return ais_until_converged(toy.log_lik, x, 2, settings, log_px - 50.0, 1024, torch.Generator().manual_seed(7),
                                   check_temperatures=2, ladder_tolerance=tolerance)

    loose, res = run(0.0), run(0.05)
    assert loose.rounds == 1 and loose.converged and paired_difference(loose.log_px, log_px)[0] < -0.5
    assert res.rounds > 1 and res.converged and res.temperatures < 1024
    assert paired_difference(res.log_px, res.shorter)[0] <= 0.05
    assert abs(paired_difference(res.log_px, log_px)[0]) < 0.1


@pytest.mark.parametrize("toy_name", ["linear_gaussian", "bimodal"])
def test_a_short_ladder_grows_until_it_meets_the_exact_log_px(linear_gaussian, toy_name):
    """Started at 8 temperatures, AIS is below log p(x) beyond its noise; checked against the exact
    value (closed form / d = 2 quadrature: the best bound there is) it grows until within 2 standard
    errors. Measured (64 x): 4 rounds each (64 temperatures), AIS − exact −0.054 ± 0.032 / −0.060 ±
    0.042 nats, from −0.127 / −0.129 at 32 temperatures. (The AIS seed differs from the data's: the
    same stream would start a particle at each x's true latent.)"""
    if toy_name == "bimodal":
        toy = Bimodal()
        x, _ = toy.sample(64, torch.Generator().manual_seed(1))
        log_px = toy.log_evidence(x)
    else:
        toy, x, log_px = linear_gaussian
    settings = AISSettings(temperatures=8, particles=16, moves=2)
    res = ais_until_converged(toy.log_lik, x, 2, settings, log_px, 1024, torch.Generator().manual_seed(7))
    assert res.rounds > 1 and res.temperatures < 1024 and res.converged is True
    assert -0.15 < res.minus_bound_nats < 0.05
    assert paired_difference(res.shorter, log_px)[0] < res.minus_bound_nats  # the shorter ladder was lower
