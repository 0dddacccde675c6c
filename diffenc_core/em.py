"""The alternating trainer of the diffusion encoder (docs/method.md §3).

Per mini-batch: an E-step (encoder sample or persistent chain, refined by MALA on the
beta-tempered energy with the alignment term; optionally a tempered-SMC start that moves mass
between modes), then ``encoder_updates`` steps of the plain denoising loss on ``(x, z*)``, then
``decoder_updates`` M-steps on ``-log p(x|z*)``. Persistent chains and per-example step sizes are
kept for every training example and saved with the checkpoint.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from diffenc_core.config import Config
from diffenc_core.encoder import DiffusionEncoder
from diffenc_core.langevin import e_step
from diffenc_core.networks import build_decoder
from diffenc_core.smc import tempered_smc


class DiffusionEM(nn.Module):
    """Diffusion encoder + decoder + the E-step state of every training example."""

    name = "diffusion"

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
        self.grad_clip = cfg.train.grad_clip
        self.encoder = DiffusionEncoder.from_config(cfg.model, x_dim, image_shape)
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
        frozen = [p for p in self.decoder.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
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
            steps = em.warmup_langevin_steps if step < em.warmup_steps else em.langevin_steps
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
        finally:
            for p in frozen:
                p.requires_grad_(True)
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
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()

    def train_step(self, step: int, idx: Tensor, x: Tensor) -> dict[str, float]:
        """One E / encoder / M round on a mini-batch; returns scalars for the history."""
        z_star, stats = self.e_step(step, idx, x)
        for _ in range(self.em.encoder_updates):
            loss_enc = self.encoder.loss(x, z_star)
            self._update(self.opt_encoder, self.encoder.parameters(), loss_enc)
        if self.opt_decoder is None:
            with torch.no_grad():
                loss_dec = -self.decoder.log_prob(x, z_star).mean()
        for _ in range(self.em.decoder_updates if self.opt_decoder is not None else 0):
            loss_dec = -self.decoder.log_prob(x, z_star).mean()
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
        return self.amortised.log_q(x, steps=ev.sampler_steps, sampler=sampler)

    def encoder_nfe(self) -> int:
        return self.amortised.nfe(self.cfg.eval.sampler, self.cfg.eval.sampler_steps)
