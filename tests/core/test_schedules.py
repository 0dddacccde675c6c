"""The training schedules that keep the decoder encodable (docs/method.md §3, §10): the VAE phase,
the M-step's latents, the head's loss, warm starts from a VAE run, chain replay."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from tiny import tiny

from diffenc_core import checkpoint, config, data, evaluate, optim, runs, runstart, trainer
from diffenc_core.em import DiffusionEM
from diffenc_core.errors import ConfigError, RunError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.prepare(config.load(None, [f"data.root={root}"]).data)
    return root


def _cfg(prepared, tmp_path, *sets):
    return config.load(None, tiny(f"data.root={prepared}", f"train.runs_dir={tmp_path / 'runs'}",
                                  "train.val_every=5", "train.checkpoint_every=5", *sets))


def _models(run: runs.Run, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return checkpoint.load(run.checkpoint_dir / name)["models"]


def _decoder(models: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in models.items() if k.startswith("decoder.")}


def _vae(prepared, tmp_path, steps: int = 10) -> runs.Run:
    return trainer.train(_cfg(prepared, tmp_path, "train.method=vae", "train.run=vae", f"train.steps={steps}"),
                         progress=False)


@pytest.mark.parametrize("m_step", ["frozen", "zstar", "encoder", "head"])
def test_the_vae_phase_is_the_vae_baseline_and_only_a_frozen_m_step_keeps_its_decoder(prepared, tmp_path, m_step):
    """Same seed: the diffusion run's 10-step VAE phase ends with exactly the 10-step VAE's decoder
    (bit for bit); EM with a frozen M-step keeps it, the other M-steps move it."""
    vae_models = _models(_vae(prepared, tmp_path))
    vae = _decoder(vae_models)
    diff = trainer.train(_cfg(prepared, tmp_path, "train.run=diff", "train.steps=3", "em.vae_steps=10",
                              f"em.m_step={m_step}"), progress=False)
    assert diff.status()["steps"] == 13
    phase = checkpoint.load(diff.checkpoint_dir / trainer.VAE_PHASE)
    assert phase["method"] == "vae" and phase["step"] == 10 and phase["models"].keys() == vae_models.keys()
    assert all(torch.equal(vae_models[k], phase["models"][k]) for k in vae_models), "vae_phase.pt is the VAE's"
    after = _decoder(_models(diff))
    same = all(torch.equal(vae[k], after[k]) for k in vae)
    assert same == (m_step == "frozen")
    if m_step == "frozen":  # and the phase's checkpoint at step 10 is the baseline too
        hist = diff.history()
        assert {"loss_vae", "loss_encoder"} <= set(hist.columns)
        assert hist.loc[hist.step <= 10, "loss_encoder"].isna().all()
        assert hist.loc[hist.step > 10, "loss_vae"].isna().all()


def test_best_checkpoint_and_learning_rate_follow_the_em_phase(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, "train.steps=10", "em.vae_steps=10")
    run = trainer.train(cfg, progress=False)
    assert checkpoint.load(run.checkpoint_dir / "best.pt")["step"] > 10, "best.pt is a diffusion encoder"
    method = trainer.build_method(cfg, data.read_manifest(cfg.data.prepared_dir))
    total = cfg.total_steps
    scales = [optim.lr_scale(cfg, s, 0.0, *method.phase_bounds(s, total)) for s in (0, 9, 10, 19)]
    assert scales[0] == scales[2] == 1.0, "the cosine restarts when EM starts"
    assert scales[1] < 0.1 and scales[3] < 0.1


def test_head_by_the_elbo_leaves_a_frozen_decoder_alone(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, "train.steps=4", "em.vae_steps=0", "em.head_loss=elbo")
    manifest = data.read_manifest(cfg.data.prepared_dir)
    x = data.load_split(cfg.data.prepared_dir, "train").x
    torch.manual_seed(0)
    method = trainer.build_method(cfg, manifest)
    method.attach_data(trainer.TrainingSet(x))
    dec0 = {k: v.clone() for k, v in method.decoder.state_dict().items()}
    head0 = {k: v.clone() for k, v in method.encoder.head.state_dict().items()}
    idx = torch.arange(32)
    for step in range(3):
        stats = method.train_step(step, idx, x[idx])
    assert math.isfinite(stats["loss_encoder"])
    assert all(torch.equal(dec0[k], v) for k, v in method.decoder.state_dict().items())
    assert all(p.grad is None or not p.grad.any() for p in method.decoder.parameters())
    assert not all(torch.equal(head0[k], v) for k, v in method.encoder.head.state_dict().items())


def test_warm_start_seeds_decoder_and_head_from_a_vae_run(prepared, tmp_path):
    vae_run = _vae(prepared, tmp_path)
    vae = checkpoint.load(vae_run.checkpoint_dir / "best.pt")["models"]
    cfg = _cfg(prepared, tmp_path, "train.run=warm", "train.warm_start=vae", "train.steps=1", "em.encoder_updates=1")
    assert cfg.total_steps == 1, "a warm start replaces the VAE phase"
    run = trainer.train(cfg, progress=False)
    got = _models(run)
    assert all(torch.equal(vae[k], got[k]) for k in vae if k.startswith("decoder."))
    assert run.params()["train"]["warm_start"] == "vae"


@pytest.mark.parametrize(("sets", "needle"), [
    (["train.warm_start=nothere"], "train.warm_start: .*nothere has no checkpoint"),
    (["train.warm_start=diffsrc"], "train.warm_start: .*'diffusion' run, not a VAE run"),
    (["train.warm_start=vae", "model.latent_dim=3"], "train.warm_start: .*does not fit this model"),
])
def test_warm_start_mistakes_are_one_message(prepared, tmp_path, sets, needle):
    _vae(prepared, tmp_path, steps=2)
    trainer.train(_cfg(prepared, tmp_path, "train.run=diffsrc", "train.steps=2"), progress=False)
    with pytest.raises((ConfigError, RunError), match=needle):
        trainer.train(_cfg(prepared, tmp_path, "train.run=warm", "train.steps=1", *sets), progress=False)
    assert not (tmp_path / "runs" / "warm" / "checkpoints" / "last.pt").exists()


def test_replay_draws_pairs_only_from_examples_with_a_chain():
    cfg = config.load(None, tiny("em.vae_steps=0"))
    method = DiffusionEM(cfg, x_dim=5, n_train=40)
    x = torch.arange(200, dtype=torch.float32).reshape(40, 5)
    method.attach_data(trainer.TrainingSet(x))
    owned = torch.tensor([3, 17, 29])
    method.has_chain[owned] = True
    method.chains[owned] = owned.float().unsqueeze(-1).expand(-1, cfg.model.latent_dim)
    xs, zs = method.replay_pairs(64)
    rows = (xs[:, 0] / 5).long()
    assert set(rows.tolist()) <= set(owned.tolist())
    assert torch.equal(zs[:, 0].long(), rows), "each z* is its own example's chain"


def test_a_new_chain_starts_at_the_step_size_the_other_chains_adapted_to():
    """Steps adapt only on visits (once an epoch on a large set): a first visit starts where the others got."""
    cfg = config.load(None, tiny("em.vae_steps=0", "em.step_size=0.01"))
    method = DiffusionEM(cfg, x_dim=5, n_train=40)
    idx = torch.tensor([0, 5, 6])
    assert torch.allclose(method.start_log_step(idx), torch.full((3,), math.log(0.01))), "no chain yet anywhere"
    method.has_chain[[5, 7, 8]] = True
    method.log_step[[5, 7, 8]] = torch.tensor([math.log(0.2), math.log(0.4), math.log(0.8)])
    got = method.start_log_step(idx)
    assert got[1] == method.log_step[5], "an example with a chain keeps its own step"
    assert torch.allclose(got[[0, 2]], torch.full((2,), math.log(0.4))), "the mean log step of the chains"


def test_until_em_starts_the_encoders_average_is_the_encoder():
    """Validation and checkpoints in the VAE phase see the trained head, not the average's initial copy."""
    method = DiffusionEM(config.load(None, tiny("em.vae_steps=5")), x_dim=5, n_train=40)
    initial = {k: v.clone() for k, v in method.encoder.head.state_dict().items()}
    x = torch.rand(16, 5)
    for step in range(3):
        method.train_step(step, torch.arange(16), x)
    head = method.encoder.head.state_dict()
    assert not all(torch.equal(initial[k], v) for k, v in head.items()), "the VAE phase trained the head"
    saved = method.state()["models"]
    assert all(torch.equal(saved[f"ema.head.{k}"], v) for k, v in head.items())
    assert all(torch.equal(method.amortised.head.state_dict()[k], v) for k, v in head.items())


def test_encoder_pairs_are_the_batch_then_replayed_chains():
    cfg = config.load(None, tiny("em.vae_steps=0", "em.encoder_updates=3"))
    method = DiffusionEM(cfg, x_dim=5, n_train=40)
    x = torch.arange(200, dtype=torch.float32).reshape(40, 5)
    method.attach_data(trainer.TrainingSet(x))
    method.has_chain[:] = True
    batch, z = x[:4], torch.zeros(4, cfg.model.latent_dim)
    pairs = list(method.encoder_pairs(batch, z))
    assert len(pairs) == 3 and pairs[0][0] is batch and pairs[0][1] is z
    assert all(p[0].shape == batch.shape for p in pairs[1:])
    plain = DiffusionEM(config.load(None, tiny("em.vae_steps=0", "em.encoder_updates=2", "em.replay_chains=false")),
                        x_dim=5, n_train=40)
    assert all(p[0] is batch for p in plain.encoder_pairs(batch, z)), "without replay: the batch again"


def test_dynamic_binarisation_draws_a_fresh_sample_every_time():
    x = torch.full((50, 30), 0.5)
    examples = trainer.TrainingSet(x, binary=True)
    a, b = examples(torch.arange(50)), examples(torch.arange(50))
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b)
    assert 0.4 < a.mean().item() < 0.6
    assert torch.equal(trainer.TrainingSet(x)(torch.arange(3)), x[:3])


def test_base_none_trains_em_from_scratch_and_rejects_what_needs_a_head():
    assert config.load(None, ["model.encoder.base=none"]).vae_phase_steps == 0
    assert config.load(None, []).vae_phase_steps == config.load(None, []).em.vae_steps > 0
    assert config.load(None, ["train.method=vae"]).total_steps == config.load(None, []).train.steps
    with pytest.raises(ConfigError, match="base 'none' has no Gaussian head, which em.m_step 'head'"):
        config.load(None, ["model.encoder.base=none", "em.m_step=head"])


def test_a_time_budget_paces_the_last_phase_from_where_it_began():
    """With a time budget the EM phase's cosine counts its share of the time left when it began, so it starts at
    the top even when the VAE phase used half the budget."""
    cfg = config.load(None, ["train.steps=1000000", "train.time_budget_s=100", "em.vae_steps=10"])
    start, end = 10, cfg.total_steps
    assert optim.lr_scale(cfg, 10, 50.0, start, end, phase_start_s=50.0) == 1.0
    mid = optim.lr_scale(cfg, 11, 75.0, start, end, phase_start_s=50.0)
    assert mid == pytest.approx(cfg.train.lr_final_ratio + (1 - cfg.train.lr_final_ratio) * 0.5)
    assert optim.lr_scale(cfg, 12, 100.0, start, end, phase_start_s=50.0) == pytest.approx(cfg.train.lr_final_ratio)


@pytest.mark.parametrize(("n_train", "fits"), [(1437, "frozen"), (3_999, "frozen"), (4_000, "zstar"),
                                               (55_000, "zstar")])
def test_the_default_m_step_is_the_papers_from_four_thousand_training_examples(n_train, fits):
    """``em.m_step: auto`` (docs/method.md §11): on 1 437 digits every decoder update overfits, on 4 000, 9 600 and
    55 000 images the paper's M-step wins; an explicit setting is kept whatever the size."""
    em = DiffusionEM(config.load(None, tiny()), x_dim=64, n_train=n_train)
    assert em.m_step_latents_from == fits and em.updates_decoder == (fits == "zstar")
    kept = DiffusionEM(config.load(None, tiny("em.m_step=encoder")), x_dim=64, n_train=n_train)
    assert kept.m_step_latents_from == "encoder"


def test_the_encoders_average_carries_no_autograd_history(prepared, tmp_path):
    """The EMA update (§3) runs outside autograd: before, every average weight stopped being a leaf and grew
    a graph node per EM step (~18 KB a step for the guided encoder, ~1.8 GB per 100 000 steps)."""
    cfg = _cfg(prepared, tmp_path)
    split = data.load_split(cfg.data.prepared_dir, "train")
    torch.manual_seed(0)
    em = trainer.build_method(cfg, split.manifest)
    em.attach_data(trainer.TrainingSet(split.x))
    idx = torch.arange(16)
    for step in range(2):
        em.train_step(step, idx, split.x[idx])
    assert all(p.is_leaf and not p.requires_grad for p in em.ema.parameters())


def _as_before_guidance(run: runs.Run) -> None:
    """Rewrite a run's stored settings as a run from before ``model.encoder.guidance`` and ``em.m_step: auto``."""
    params = yaml.safe_load(run.file("params.yaml").read_text())
    del params["model"]["encoder"]["guidance"]
    params["em"]["m_step"] = "frozen"
    run.file("params.yaml").write_text(yaml.safe_dump(params))
    for path in run.checkpoint_dir.glob("*.pt"):
        state = checkpoint.load(path)
        del state["config"]["model"]["encoder"]["guidance"]
        state["config"]["em"]["m_step"] = "frozen"
        checkpoint.save(path, state)


def test_a_run_from_before_guidance_evaluates_and_resumes(prepared, tmp_path):
    """Such a run reads as unguided (its checkpoint has no guide weights) and resumes as long as what its
    training reads is unchanged: a VAE run with today's defaults, a small diffusion run with `guidance: none`
    (`auto` is `frozen` there, as it was)."""
    old = trainer.train(_cfg(prepared, tmp_path, "model.encoder.guidance=none", "train.run=old"), progress=False)
    vae = _vae(prepared, tmp_path)
    for run in (old, vae):
        _as_before_guidance(run)
    method, cfg = evaluate.load_method(old)
    assert cfg.model.encoder.guidance == "none" and not method.encoder.guided
    runstart.plan(_cfg(prepared, tmp_path, "train.method=vae", "train.run=vae", "train.steps=20"), "resume")
    runstart.plan(_cfg(prepared, tmp_path, "model.encoder.guidance=none", "train.run=old", "train.steps=40"),
                  "resume")
    with pytest.raises(ConfigError, match="model.encoder.guidance: none → likelihood"):
        runstart.plan(_cfg(prepared, tmp_path, "train.run=old", "train.steps=40"), "resume")


def test_the_guide_reads_the_tempered_likelihood():
    """At ``train.beta`` the guided encoder's target is ``p(z) p(x|z)^(1/beta)`` (docs/method.md §1, §4)."""
    em = DiffusionEM(config.load(None, tiny("train.beta=2")), x_dim=64, n_train=100)
    x, z = torch.rand(3, 64), torch.randn(3, 4)
    torch.testing.assert_close(em.log_lik(x, z), em.decoder.log_prob(x, z) / 2)
