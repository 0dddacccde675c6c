"""A tiny profile (``--set`` overrides) so tests train real models in seconds."""

TINY_SETS = [
    "train.steps=20",
    "train.batch_size=64",
    "train.log_every=5",
    "train.val_every=10",
    "train.checkpoint_every=10",
    "model.latent_dim=4",
    "model.decoder.hidden=32",
    "model.encoder.hidden=32",
    "model.encoder.blocks=1",
    "model.encoder.x_embed_dim=16",
    "model.encoder.time_embed_dim=16",
    "model.vae.hidden=32",
    "em.langevin_steps=3",
    "em.warmup_steps=0",
    "em.vae_steps=0",
    "em.init_sampler_steps=3",
    "eval.sampler_steps=3",
    "eval.logq_steps=3",
    "eval.ais_temperatures=20",
    "eval.ais_check_temperatures=5",
    "eval.ais_particles=4",
    "eval.rate_steps=10",
    "eval.refine_steps=3",
    "eval.iwae_k=4",
    "eval.n_test=60",
    "eval.n_recon=6",
]


def tiny(*extra: str) -> list[str]:
    """The tiny profile plus extra overrides."""
    return [*TINY_SETS, *extra]
