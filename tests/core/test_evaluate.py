"""Evaluation of a trained run: the bounds on one set of x, AIS log p(x) and each bound's gap to it."""

from __future__ import annotations

import pytest
from tiny import tiny

from diffenc_core import config, data, evaluate, trainer


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


def test_the_base_only_elbo_is_reported_for_the_diffusion_encoder(evaluated):
    assert "elbo_base_only_nats" in evaluated["diffusion"]
    assert "elbo_base_only_nats" not in evaluated["vae"]
