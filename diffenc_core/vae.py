"""The Gaussian-VAE baseline (docs/method.md §6): same decoder and latent size, trained jointly.

Loss per example: ``-E_q log p(x|z) + beta * KL(N(mu, std^2) || N(0, I))`` by reparameterisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from diffenc_core import optim
from diffenc_core.config import Config
from diffenc_core.distributed import DataParallelMethod, LossModule
from diffenc_core.networks import GaussianEncoderNet, build_decoder

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mu: Tensor, log_std: Tensor) -> Tensor:
    """``KL(N(mu, diag exp(2 log_std)) || N(0, I))`` per example, in nats."""
    return 0.5 * (mu.pow(2) + (2 * log_std).exp() - 1.0 - 2 * log_std).sum(-1)


def gaussian_log_q(z: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
    return (-0.5 * ((z - mu) / log_std.exp()).pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


def reparameterised_elbo(
    encoder: nn.Module, decoder: nn.Module, x: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, rec, kl)``: the batch mean of ``-log p(x|z) + beta KL`` with ``z`` reparameterised, and
    its per-example parts (detached). The baseline's loss, and a diffusion run's VAE phase."""
    mu, log_std = encoder(x)
    z = mu + log_std.exp() * torch.randn_like(mu)
    rec = -decoder.log_prob(x, z)
    kl = gaussian_kl(mu, log_std)
    return (rec + beta * kl).mean(), rec.detach(), kl.detach()


class GaussianVAE(DataParallelMethod, nn.Module):
    """Encoder ``N(mu(x), diag std(x)^2)`` + the shared decoder."""

    name = "vae"

    def __init__(
        self,
        cfg: Config,
        x_dim: int,
        image_shape: tuple[int, int, int] | None = None,
        decoder: nn.Module | None = None,
    ):
        super().__init__()
        self.beta = cfg.train.beta
        self.clip = cfg.train.grad_clip
        self.encoder = GaussianEncoderNet.from_config(x_dim, cfg.model.latent_dim, cfg.model.vae, image_shape)
        self.decoder = decoder if decoder is not None else build_decoder(cfg.model, x_dim, image_shape,
                                                                         cfg.likelihood)
        self.optimizer = optim.adam(
            [
                {"params": self.encoder.parameters(), "lr": cfg.train.lr_encoder},
                {"params": self.decoder.parameters(), "lr": cfg.train.lr_decoder},
            ],
            cfg.train.lr_encoder,
        )
        self.losses = {"vae": LossModule(self.elbo_loss, encoder=self.encoder, decoder=self.decoder)}

    # -- training
    def elbo_loss(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return reparameterised_elbo(self.encoder, self.decoder, x, self.beta)

    def train_step(self, step: int, idx: Tensor, x: Tensor) -> dict[str, Tensor]:
        """One reparameterised-ELBO step on the mini-batch ``x`` (§6); values stay tensors."""
        loss, rec, kl = self.losses["vae"](x)
        optim.update(loss, self.optimizer, clip=self.clip)
        stats = {"loss_vae": loss.detach(), "recon_nll": rec.mean(), "rate": kl.mean()}
        if hasattr(self.decoder, "sigma"):
            stats["sigma_x"] = self.decoder.sigma().detach()
        return stats

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    @staticmethod
    def phase_bounds(step: int, total: int) -> tuple[int, int]:
        """One phase: the whole run (the learning-rate schedule spans it)."""
        return 0, total

    # -- checkpoint
    def state(self) -> dict[str, Any]:
        return {"models": self.state_dict(), "optimizers": {"vae": self.optimizer.state_dict()}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["models"])
        self.optimizer.load_state_dict(state["optimizers"]["vae"])

    # -- the amortised encoder, as evaluation sees it
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        mu, log_std = self.encoder(x)
        return mu + log_std.exp() * torch.randn_like(mu)

    @torch.no_grad()
    def encode_with_rate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A sample and the exact rate ``KL(q(z|x) || p(z))``."""
        mu, log_std = self.encoder(x)
        return mu + log_std.exp() * torch.randn_like(mu), gaussian_kl(mu, log_std)

    @torch.no_grad()
    def encode_with_log_q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A sample and its exact ``log q(z|x)`` (for ELBO and IWAE)."""
        mu, log_std = self.encoder(x)
        z = mu + log_std.exp() * torch.randn_like(mu)
        return z, gaussian_log_q(z, mu, log_std)

    def encoder_nfe(self) -> int:
        return 1
