"""diffenc_core: the Diffusion Encoder library (pure torch; no orchestration imports)."""

__version__ = "0.1.0"
