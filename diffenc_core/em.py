"""The alternating trainer of the diffusion encoder (docs/method.md §3, §10).

A diffusion run has two phases. The first ``em.vae_steps`` train the encoder's Gaussian head and
the decoder together as a Gaussian VAE (the reparameterised ELBO), so EM starts from a decoder
that a Gaussian already encodes well (or they come from a VAE run: ``train.warm_start``). Then,
per mini-batch: an E-step (encoder sample or persistent chain, refined by MALA on the
beta-tempered energy with the alignment term; optionally a tempered-SMC start that moves mass
between modes), ``encoder_updates`` steps of the plain denoising loss on ``(x, z*)`` (the head
fitted by the Gaussian NLL of ``z*`` or by the ELBO), then ``decoder_updates`` M-steps whose
latents ``em.m_step`` chooses: none (``frozen``), the paper's ``z*``, or the encoder's own samples
(the ELBO's decoder gradient, no backpropagation through the sampler). Persistent chains and
per-example step sizes are kept for every training example and saved with the checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from diffenc_core.config import Config
from diffenc_core.distributed import DataParallelMethod, LossModule, weighted
from diffenc_core.encoder import DiffusionEncoder
from diffenc_core.langevin import e_step
from diffenc_core.networks import build_decoder
from diffenc_core.smc import tempered_smc
from diffenc_core.vae import reparameterised_elbo


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` that require grad are frozen inside the block (gradients flow
    through it to its inputs, none accumulate in it), then restored."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class DiffusionEM(DataParallelMethod, nn.Module):
    """Diffusion encoder + decoder + the E-step state of every training example."""

    name = "diffusion"
    PER_EXAMPLE = ("chains", "has_chain", "log_step")
    """Buffers with one row per training example: sharded over processes, gathered for checkpoints."""

    def __init__(
        self,
        cfg: Config,
        x_dim: int,
        n_train: int,
        image_shape: tuple[int, int, int] | None = None,
        decoder: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.em = cfg.em
        self.beta = cfg.train.beta
        self.vae_steps = cfg.vae_phase_steps
        self.grad_clip = cfg.train.grad_clip
        # with a VAE phase the head and decoder start as the VAE baseline's encoder and decoder do
        self.encoder = DiffusionEncoder.from_config(cfg.model, x_dim, image_shape, zero_head=self.vae_steps == 0)
        self.decoder = decoder if decoder is not None else build_decoder(cfg.model, x_dim, image_shape)
        d = cfg.model.latent_dim
        self.register_buffer("chains", torch.zeros(n_train, d))
        self.register_buffer("has_chain", torch.zeros(n_train, dtype=torch.bool))
        self.register_buffer("log_step", torch.full((n_train,), math.log(cfg.em.step_size)))
        self.opt_encoder = torch.optim.Adam(self.encoder.parameters(), lr=cfg.train.lr_encoder)
        trainable = [p for p in self.decoder.parameters() if p.requires_grad]
        # a known (toy) decoder has no parameters: then there is no M-step
        self.opt_decoder = torch.optim.Adam(trainable, lr=cfg.train.lr_decoder) if trainable else None
        self.ema: DiffusionEncoder | None = None
        if cfg.train.ema > 0:
            self.ema = copy.deepcopy(self.encoder).requires_grad_(False)
        # each loss with exactly the modules it trains (what DDP wraps)
        self.losses = {"encoder": LossModule(self.encoder_loss, encoder=self.encoder)}
        if self.encoder.head is not None:
            self.losses["vae"] = LossModule(self._vae_elbo, head=self.encoder.head, decoder=self.decoder)
        if self.opt_decoder is not None:
            self.losses["decoder"] = LossModule(self._decoder_nll, decoder=self.decoder)

    def attach_data(self, x_train: Tensor) -> None:
        """The training examples the chains belong to (row ``i`` of ``x_train`` owns chain ``i``):
        chain replay draws encoder pairs from them."""
        if x_train.shape[0] != self.chains.shape[0]:
            raise ValueError(f"{x_train.shape[0]} training examples for {self.chains.shape[0]} chains")
        self.x_train = x_train

    def replay_batch(self, size: int) -> tuple[Tensor, Tensor] | None:
        """``size`` random ``(x, z*)`` pairs from the examples that have a chain, or None."""
        x_train = getattr(self, "x_train", None)
        if x_train is None or not (self.em.replay_chains and self.em.persistent):
            return None
        ready = self.has_chain.nonzero().squeeze(-1)
        if ready.numel() == 0:
            return None
        pick = ready[torch.randint(0, ready.numel(), (size,), device=ready.device)]
        return x_train[pick], self.chains[pick]

    # ------------------------------------------------------------------------------ E-step
    def initial_latents(self, idx: Tensor, x: Tensor) -> Tensor:
        """``z0``: the persistent chain where one exists, else a fresh encoder sample (§3.1)."""
        if not self.em.persistent:
            return self.encoder.sample(x, steps=self.em.init_sampler_steps, sampler="dpmpp2m")
        z0 = self.chains[idx].clone()
        need = ~self.has_chain[idx]
        if need.any():
            z0[need] = self.encoder.sample(x[need], steps=self.em.init_sampler_steps, sampler="dpmpp2m")
        return z0

    def e_step(self, step: int, idx: Tensor, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        em = self.em
        stats: dict[str, float] = {}
        with frozen(self.decoder):
            if em.e_step == "smc":
                smc = tempered_smc(
                    self.decoder.log_prob,
                    x,
                    z_dim=self.chains.shape[1],
                    beta=self.beta,
                    particles=em.smc.particles,
                    temperatures=em.smc.temperatures,
                    moves=em.smc.moves,
                    step_size=em.step_size,
                    step_max=em.step_size_max,
                )
                z0 = smc.z
                stats["ess"] = smc.ess.mean().item()
            else:
                z0 = self.initial_latents(idx, x)
            em_step = step - self.vae_steps
            steps = em.warmup_langevin_steps if em_step < em.warmup_steps else em.langevin_steps
            res = e_step(
                self.decoder.log_prob,
                x,
                z0,
                self.log_step[idx],
                max_retries=em.max_retries,
                steps=steps,
                beta=self.beta,
                alignment=em.alignment,
                z_anchor=z0,
                adjust=em.e_step != "ula",
                target_accept=em.target_accept,
                adapt_rate=em.adapt_rate,
                step_max=em.step_size_max,
            )
        self.chains[idx] = res.z
        self.has_chain[idx] = True
        self.log_step[idx] = res.log_step
        stats.update(
            sync_gap=res.gap.mean().item(),
            accept=res.accept.mean().item(),
            move=res.move.mean().item(),
            step_size=res.log_step.exp().mean().item(),
            langevin_steps=float(steps),
            retries=float(res.retries),
        )
        return res.z, stats

    # ------------------------------------------------------------------------ the updates
    def _update(self, opt: torch.optim.Optimizer, params: Any, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        weighted(loss, self.loss_scale).backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()

    def in_vae_phase(self, step: int) -> bool:
        return step < self.vae_steps

    def phase_bounds(self, step: int, total: int) -> tuple[int, int]:
        """``[start, end)`` of the phase ``step`` is in: the learning-rate schedule restarts per phase."""
        return (0, self.vae_steps) if self.in_vae_phase(step) else (self.vae_steps, total)

    def train_step(self, step: int, idx: Tensor, x: Tensor) -> dict[str, float]:
        """One training step on a mini-batch; returns scalars for the history."""
        if self.in_vae_phase(step):
            return self.vae_step(x)
        if step == self.vae_steps and step > 0:
            self.start_em()
        return self.em_step(step, idx, x)

    def vae_step(self, x: Tensor) -> dict[str, float]:
        """The VAE phase: head and decoder by the reparameterised ELBO, exactly the baseline's loss."""
        head = self.encoder.head
        assert head is not None, "config validation guarantees a head for the VAE phase"
        loss, rec, kl = self.losses["vae"](x)
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        weighted(loss, self.loss_scale).backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_([*head.parameters(), *self.decoder.parameters()], self.grad_clip)
        for opt in opts:
            opt.step()
        return {"loss_vae": loss.item(), "recon_nll": rec.mean().item(), "rate": kl.mean().item(),
                "sigma_x": self.decoder.sigma().item()}

    def _vae_elbo(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self.encoder.head is not None
        return reparameterised_elbo(self.encoder.head, self.decoder, x, self.beta)

    def _decoder_nll(self, x: Tensor, z: Tensor) -> Tensor:
        return -self.decoder.log_prob(x, z).mean()

    def start_em(self) -> None:
        """The switch from the VAE phase to EM: fresh optimiser moments for the new losses, and the
        EMA (if any) starts from the warm encoder."""
        for opt in self.optimizers():
            opt.state.clear()
        if self.ema is not None:
            self.ema.load_state_dict(self.encoder.state_dict())

    def warm_start(self, decoder_state: dict[str, Tensor], head_state: dict[str, Tensor]) -> None:
        """Seed the decoder and the Gaussian head from a trained VAE (its decoder and encoder)."""
        assert self.encoder.head is not None, "config validation guarantees a head to seed"
        self.decoder.load_state_dict(decoder_state)
        self.encoder.head.load_state_dict(head_state)
        if self.ema is not None:
            self.ema.load_state_dict(self.encoder.state_dict())

    def encoder_loss(self, x: Tensor, z_star: Tensor) -> Tensor:
        """Denoising on ``(x, z*)``; the head by the NLL of ``z*`` or by the reparameterised ELBO."""
        head = self.encoder.head
        if self.em.head_loss == "nll" or head is None:
            return self.encoder.loss(x, z_star)
        with frozen(self.decoder):  # the decoder learns only in the M-step
            elbo_loss, _, _ = reparameterised_elbo(head, self.decoder, x, self.beta)
        return self.encoder.loss(x, z_star, fit_head=False) + elbo_loss

    def m_step_latents(self, x: Tensor, z_star: Tensor) -> Tensor:
        """The latents the decoder is fitted to (``em.m_step``), all without gradient."""
        if self.em.m_step == "zstar":
            return z_star
        if self.em.m_step == "encoder":
            return self.encoder.sample(x, steps=self.em.init_sampler_steps, sampler="dpmpp2m")
        with torch.no_grad():  # "head"
            mu, log_std = self.encoder._head(x)
            return mu + log_std.exp() * torch.randn_like(mu)

    def em_step(self, step: int, idx: Tensor, x: Tensor) -> dict[str, float]:
        """One E / encoder / M round on a mini-batch."""
        z_star, stats = self.e_step(step, idx, x)
        for i in range(self.em.encoder_updates):
            pairs = self.replay_batch(x.shape[0]) if i > 0 else None
            loss_enc = self.losses["encoder"](*(pairs if pairs is not None else (x, z_star)))
            self._update(self.opt_encoder, self.encoder.parameters(), loss_enc)
        updates = self.em.decoder_updates if self.updates_decoder else 0
        if updates == 0:
            with torch.no_grad():
                loss_dec = -self.decoder.log_prob(x, z_star).mean()
        for _ in range(updates):
            loss_dec = self.losses["decoder"](x, self.m_step_latents(x, z_star))
            self._update(self.opt_decoder, self.decoder.parameters(), loss_dec)
        if self.ema is not None:
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.encoder.parameters(), strict=True):
                    pe.lerp_(p, 1.0 - self.cfg.train.ema)
        stats.update(
            loss_encoder=loss_enc.item(),
            recon_nll=loss_dec.item(),
            sigma_x=self.decoder.sigma().item(),
        )
        return stats

    @property
    def updates_decoder(self) -> bool:
        """Whether the EM phase has an M-step: not for a frozen or known (parameter-free) decoder."""
        return self.opt_decoder is not None and self.em.m_step != "frozen"

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_encoder, self.opt_decoder) if o is not None]

    # -------------------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        return {
            "models": self.state_dict(),
            "optimizers": {
                "encoder": self.opt_encoder.state_dict(),
                **({"decoder": self.opt_decoder.state_dict()} if self.opt_decoder is not None else {}),
            },
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["models"])
        self.opt_encoder.load_state_dict(state["optimizers"]["encoder"])
        if self.opt_decoder is not None:
            self.opt_decoder.load_state_dict(state["optimizers"]["decoder"])

    # ------------------------------------------------------- the amortised encoder, for eval
    @property
    def amortised(self) -> DiffusionEncoder:
        return self.ema if self.ema is not None else self.encoder

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        ev = self.cfg.eval
        return self.amortised.sample(x, steps=ev.sampler_steps, sampler=ev.sampler)

    @torch.no_grad()
    def encode_with_rate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Ancestral samples and the free path-KL bound on the rate (§5)."""
        return self.amortised.sample_with_rate(x, steps=self.cfg.eval.rate_steps)

    def encode_with_log_q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Deterministic-sampler samples with their exact ``log q`` through the Jacobian."""
        ev = self.cfg.eval
        sampler = ev.sampler if ev.sampler != "ancestral" else "dpmpp2m"
        return self.amortised.log_q(x, steps=ev.logq_steps, sampler=sampler)

    def encoder_nfe(self) -> int:
        return self.amortised.nfe(self.cfg.eval.sampler, self.cfg.eval.sampler_steps)
