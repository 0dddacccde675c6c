"""The log-SNR VP schedule (docs/method.md §4, §9)."""

from __future__ import annotations

import pytest
import torch

from diffenc_core.config import EncoderConfig
from diffenc_core.schedule import LogSNRSchedule

torch.set_num_threads(1)


def test_alpha_sigma_variance_preserving():
    sch = LogSNRSchedule()
    lam = torch.linspace(-20.0, 20.0, 101)
    alpha, sigma = sch.alpha_sigma(lam)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(lam))
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), lam, atol=1e-4, rtol=1e-4)
    alpha, sigma = sch.alpha_sigma(sch.grid(40, dtype=torch.float64))
    assert (alpha[1:] > alpha[:-1]).all() and (sigma[1:] < sigma[:-1]).all()


def test_grid_endpoints_and_monotone():
    sch = LogSNRSchedule(-6.0, 10.0)
    grid = sch.grid(16)
    assert grid.shape == (17,)
    assert grid[0].item() == pytest.approx(-6.0) and grid[-1].item() == pytest.approx(10.0)
    steps = grid[1:] - grid[:-1]
    assert (steps > 0).all()
    torch.testing.assert_close(steps, torch.full_like(steps, 1.0))


def test_stratified_sampling_covers_every_stratum():
    sch = LogSNRSchedule()
    n = 50
    lam = sch.sample_logsnr(n, generator=torch.Generator().manual_seed(0))
    assert lam.shape == (n,)
    assert (lam >= sch.logsnr_min).all() and (lam <= sch.logsnr_max).all()
    strata = ((lam - sch.logsnr_min) / (sch.logsnr_max - sch.logsnr_min) * n).floor().long()
    assert sorted(strata.tolist()) == list(range(n))
    assert strata.tolist() != list(range(n))  # shuffled, not in stratum order


def test_from_config_and_validation():
    sch = LogSNRSchedule.from_config(EncoderConfig(logsnr_min=-5.0, logsnr_max=9.0))
    assert (sch.logsnr_min, sch.logsnr_max) == (-5.0, 9.0)
    with pytest.raises(ValueError):
        LogSNRSchedule(3.0, 1.0)
