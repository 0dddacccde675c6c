"""The diffusion encoder trained by alternating EM (docs/method.md §3, §10).

A diffusion run has two phases. The first ``em.vae_steps`` train the encoder's Gaussian head and the
decoder together as a Gaussian VAE (the baseline's loss), so EM starts from a decoder a Gaussian
already encodes well (or they come from a VAE run: ``train.warm_start``). Then every step is one
round of §3 on a mini-batch:

1. **E-step**: each example's ``z0`` (its persistent chain, an encoder sample, or a tempered-SMC draw)
   refined by Langevin on ``q*_β(z|x) ∝ p(z) p(x|z)^(1/β)`` into ``z*``; every example keeps its chain
   and adapted step size;
2. **encoder updates**: the plain denoising loss on pairs ``(x, z*)`` (the batch's own, then pairs
   replayed from every example's chain), the Gaussian head by the ELBO or by the NLL of ``z*``;
3. **M-step**: the decoder fitted by ``-log p(x|z)`` to the latents ``em.m_step`` chooses (none when
   ``frozen``).

Values stay tensors (no host synchronisation); the trainer reads them on log steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from diffenc_core import config, langevin, optim
from diffenc_core.config import Config
from diffenc_core.distributed import DataParallelMethod, LossModule
from diffenc_core.encoder import DiffusionEncoder
from diffenc_core.networks import build_decoder
from diffenc_core.smc import tempered_smc
from diffenc_core.vae import reparameterised_elbo

Examples = Callable[[Tensor], Tensor]
"""Training examples by index (a fresh binarisation each call for dynamically binarised data)."""


@contextmanager
def parameters_fixed(module: nn.Module) -> Iterator[None]:
    """Inside the block no gradient accumulates in ``module``'s parameters (it still flows to its inputs)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class DiffusionEM(DataParallelMethod, nn.Module):
    """Diffusion encoder + decoder + every training example's E-step state."""

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
        self.cfg, self.em, self.beta = cfg, cfg.em, cfg.train.beta
        self.m_step_latents_from = config.resolve_m_step(cfg.em.m_step, n_train)  # §3.3, ``auto`` by training-set size
        self.vae_steps = cfg.vae_phase_steps
        self.clip = cfg.train.grad_clip
        # with a VAE phase the head and decoder start as the VAE baseline's encoder and decoder do
        self.encoder = DiffusionEncoder.from_config(cfg.model, x_dim, image_shape, zero_head=self.vae_steps == 0)
        self.decoder = decoder if decoder is not None else build_decoder(cfg.model, x_dim, image_shape,
                                                                         cfg.likelihood)
        # §3.1: each example's chain (its latest z*), whether it has one yet, its adapted MALA step size
        self.register_buffer("chains", torch.zeros(n_train, cfg.model.latent_dim))
        self.register_buffer("has_chain", torch.zeros(n_train, dtype=torch.bool))
        self.register_buffer("log_step", torch.full((n_train,), math.log(cfg.em.step_size)))
        self.opt_encoder = optim.adam(self.encoder.parameters(), cfg.train.lr_encoder)
        trainable = [p for p in self.decoder.parameters() if p.requires_grad]
        self.opt_decoder = optim.adam(trainable, cfg.train.lr_decoder) if trainable else None  # none: a toy's truth
        self.ema = copy.deepcopy(self.encoder).requires_grad_(False) if cfg.train.ema > 0 else None
        self.ema_behind = False  # the VAE phase trained the head after the average last copied it
        self.examples: Examples | None = None
        # each loss with exactly the modules it trains (what DistributedDataParallel wraps)
        self.losses = {"encoder": LossModule(self.encoder_loss, encoder=self.encoder)}
        if self.encoder.head is not None:
            self.losses["vae"] = LossModule(self.vae_loss, head=self.encoder.head, decoder=self.decoder)
        if self.opt_decoder is not None:
            self.losses["decoder"] = LossModule(self.decoder_loss, decoder=self.decoder)

    def attach_data(self, examples: Examples) -> None:
        """Where chain replay reads ``x`` for the examples it draws (row ``i`` owns chain ``i``)."""
        self.examples = examples

    # ------------------------------------------------------------------------------ a step
    def train_step(self, step: int, idx: Tensor, x: Tensor) -> dict[str, Tensor]:
        """One training step on the mini-batch ``(idx, x)``: the VAE phase's or one EM round."""
        if step < self.vae_steps:
            return self.vae_step(x)
        if step == self.vae_steps > 0:
            self.start_em()
        return self.em_step(step, idx, x)

    def em_step(self, step: int, idx: Tensor, x: Tensor) -> dict[str, Tensor]:
        """One round of docs/method.md §3: E-step, encoder updates, M-step."""
        z_star, stats = self.e_step(step, idx, x)
        for pairs in self.encoder_pairs(x, z_star):
            stats["loss_encoder"] = optim.update(self.losses["encoder"](*pairs), self.opt_encoder, clip=self.clip)
        stats["recon_nll"] = self.m_step(x, z_star, stats.pop("log_lik"))
        if self.ema is not None:  # the encoder evaluation uses; ramps up so short runs average recent weights
            n = step - self.vae_steps
            decay = min(self.cfg.train.ema, (1 + n) / (10 + n))
            with torch.no_grad():  # else every average weight grows an autograd chain, one node per step
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.encoder.parameters()), 1.0 - decay)
        return stats

    def vae_step(self, x: Tensor) -> dict[str, Tensor]:
        """The VAE phase: head and decoder by the reparameterised ELBO, exactly the baseline's step."""
        loss, rec, kl = self.losses["vae"](x)
        optim.update(loss, *self.optimizers(), clip=self.clip)
        self.ema_behind = True  # the average starts with EM; until then it is the encoder (see ``amortised``)
        return {"loss_vae": loss.detach(), "recon_nll": rec.mean(), "rate": kl.mean(), **self.decoder_stats()}

    # ------------------------------------------------------------------------- 1. E-step
    def e_step(self, step: int, idx: Tensor, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """§3.1: ``z*`` for the batch, kept as every example's chain (on every process of a job)."""
        em = self.em
        with parameters_fixed(self.decoder):
            z0, stats = self.initial_latents(idx, x)
            warming = step - self.vae_steps < em.warmup_steps
            res = langevin.refine(
                self.decoder.log_prob, x, z0, self.start_log_step(idx),
                steps=em.warmup_langevin_steps if warming else em.langevin_steps,
                beta=self.beta, alignment=em.alignment, z_anchor=z0, adjust=em.e_step != "ula",
                target_accept=em.target_accept, adapt_rate=em.adapt_rate, step_max=em.step_size_max,
                max_retries=em.max_retries, scale=self.preconditioner(x),
            )
        all_idx, all_z, all_log_step = self.world.all_gather_rows(idx, res.z, res.log_step)
        self.chains[all_idx], self.log_step[all_idx] = all_z, all_log_step
        self.has_chain[all_idx] = True
        return res.z, {**stats, "log_lik": res.log_lik, "sync_gap": res.gap.mean(), "accept": res.accept.mean(),
                       "move": res.move.mean(), "step_size": res.log_step.exp().mean(),
                       "retries": torch.tensor(float(res.retries))}

    def start_log_step(self, idx: Tensor) -> Tensor:
        """Each example's adapted MALA step; a chain's first E-step starts at the mean the others adapted to.

        Per-example steps adapt only when their example is visited, once an epoch: started at
        ``em.step_size`` on 55 000 MNIST images they stayed 3-16x too small (acceptance 0.9-1.0) for
        the whole budget (docs/method.md §11).
        """
        seen = self.has_chain.to(self.log_step.dtype)
        count = seen.sum()
        adapted = (self.log_step * seen).sum() / count.clamp(min=1.0)
        return torch.where(self.has_chain[idx] | (count == 0), self.log_step[idx], adapted)  # none yet: em.step_size

    @torch.no_grad()
    def preconditioner(self, x: Tensor) -> Tensor | None:
        """The Gaussian head's standard deviations, MALA's diagonal preconditioner (``em.precondition``)."""
        if not self.em.precondition or self.encoder.head is None:
            return None
        return self.encoder.head(x)[1].exp()

    def initial_latents(self, idx: Tensor, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``z0``: a tempered-SMC draw (``em.e_step: smc``), else the example's chain, else an encoder sample."""
        em = self.em
        if em.e_step == "smc":
            smc = tempered_smc(self.decoder.log_prob, x, z_dim=self.chains.shape[1], beta=self.beta,
                               particles=em.smc.particles, temperatures=em.smc.temperatures, moves=em.smc.moves,
                               step_size=em.step_size, step_max=em.step_size_max)
            return smc.z, {"ess": smc.ess.mean()}
        if not em.persistent:
            return self.encoder_sample(x), {}
        z0 = self.chains[idx].clone()
        need = ~self.has_chain[idx]
        if need.any():
            z0[need] = self.encoder_sample(x[need])
        return z0, {}

    def encoder_sample(self, x: Tensor) -> Tensor:
        """``z ~ q_phi(z|x)`` by ``em.init_sampler_steps`` ancestral steps (a sample, not the posterior mean)."""
        return self.encoder.sample(x, steps=self.em.init_sampler_steps, sampler="ancestral", log_lik=self.log_lik)

    # ---------------------------------------------------------------- 2. encoder updates
    def encoder_pairs(self, x: Tensor, z_star: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """§3.2: the batch's own pairs, then (``em.replay_chains``) pairs drawn from every example's chain."""
        yield x, z_star
        for _ in range(self.em.encoder_updates - 1):
            yield self.replay_pairs(x.shape[0]) if self.replays else (x, z_star)

    @property
    def replays(self) -> bool:
        return self.em.replay_chains and self.em.persistent and self.examples is not None

    def replay_pairs(self, size: int) -> tuple[Tensor, Tensor]:
        """``size`` random ``(x, z*)`` pairs from the examples that have a chain."""
        ready = self.has_chain.nonzero().squeeze(-1)
        pick = ready[torch.randint(0, ready.numel(), (size,), device=ready.device)]
        assert self.examples is not None
        return self.examples(pick), self.chains[pick]

    def encoder_loss(self, x: Tensor, z_star: Tensor) -> Tensor:
        """Denoising on ``(x, z*)``; the Gaussian head by the NLL of ``z*`` or by the ELBO (decoder fixed)."""
        if self.em.head_loss == "nll" or self.encoder.head is None:
            return self.encoder.loss(x, z_star, log_lik=self.log_lik)
        with parameters_fixed(self.decoder):  # the decoder learns only in the M-step
            elbo_loss, _, _ = reparameterised_elbo(self.encoder.head, self.decoder, x, self.beta)
        return self.encoder.loss(x, z_star, fit_head=False, log_lik=self.log_lik) + elbo_loss

    # ---------------------------------------------------------------------- 3. M-step
    def m_step(self, x: Tensor, z_star: Tensor, log_lik: Tensor) -> Tensor:
        """§3.3: ``em.decoder_updates`` fits of the decoder; returns ``-log p(x|z)`` (the E-step's when frozen)."""
        if not self.updates_decoder:
            return -log_lik.mean()
        assert self.opt_decoder is not None
        for _ in range(self.em.decoder_updates):
            loss = optim.update(self.losses["decoder"](x, self.m_step_latents(x, z_star)), self.opt_decoder,
                                clip=self.clip)
        return loss

    @property
    def updates_decoder(self) -> bool:
        """Whether EM has an M-step: not for a frozen or known (parameter-free) decoder."""
        return self.opt_decoder is not None and self.m_step_latents_from != "frozen"

    @torch.no_grad()
    def m_step_latents(self, x: Tensor, z_star: Tensor) -> Tensor:
        """The latents the decoder is fitted to: ``z*`` (the paper's), encoder or head samples."""
        if self.m_step_latents_from == "zstar":
            return z_star
        if self.m_step_latents_from == "encoder":
            return self.encoder_sample(x)
        mu, log_std = self.encoder.head(x)
        return mu + log_std.exp() * torch.randn_like(mu)

    def decoder_loss(self, x: Tensor, z: Tensor) -> Tensor:
        return -self.decoder.log_prob(x, z).mean()

    def vae_loss(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self.encoder.head is not None
        return reparameterised_elbo(self.encoder.head, self.decoder, x, self.beta)

    # --------------------------------------------------------------------------- phases
    def phase_bounds(self, step: int, total: int) -> tuple[int, int]:
        """``[start, end)`` of the phase ``step`` is in: the learning-rate schedule restarts per phase."""
        return (0, self.vae_steps) if step < self.vae_steps else (self.vae_steps, total)

    def start_em(self) -> None:
        """From the VAE phase to EM: fresh optimiser moments for the new losses; the EMA starts here."""
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

    def vae_phase_state(self) -> dict[str, Any]:
        """The head and decoder as a Gaussian VAE's model state (the baseline's keys: ``encoder.*``, ``decoder.*``)."""
        assert self.encoder.head is not None
        models = {f"encoder.{k}": v for k, v in self.encoder.head.state_dict().items()}
        models.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        return {"models": models, "optimizers": {}}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_encoder, self.opt_decoder) if o is not None]

    def decoder_stats(self) -> dict[str, Tensor]:
        return {"sigma_x": self.decoder.sigma().detach()} if hasattr(self.decoder, "sigma") else {}

    # -------------------------------------------------------------------------- checkpoint
    def state(self) -> dict[str, Any]:
        self.catch_up_ema()
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
        """The encoder evaluation uses: the weights' average (§3), which is the encoder itself until EM starts."""
        self.catch_up_ema()
        return self.ema if self.ema is not None else self.encoder

    def catch_up_ema(self) -> None:
        """In the VAE phase the average is the encoder, copied when read (validation, checkpoints); without
        this, validation in the VAE phase scored the untrained initial head (-ELBO 465-650 on MNIST)."""
        if self.ema is not None and self.ema_behind:
            self.ema.load_state_dict(self.encoder.state_dict())
            self.ema_behind = False

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        ev = self.cfg.eval
        return self.amortised.sample(x, steps=ev.sampler_steps, sampler=ev.sampler, log_lik=self.log_lik)

    @torch.no_grad()
    def encode_with_rate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Ancestral samples and the free path-KL bound on the rate (§5)."""
        return self.amortised.sample_with_rate(x, steps=self.cfg.eval.rate_steps, log_lik=self.log_lik)

    def encode_with_log_q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Deterministic-sampler samples with their exact ``log q`` through the Jacobian."""
        ev = self.cfg.eval
        sampler = ev.sampler if ev.sampler != "ancestral" else "dpmpp2m"
        return self.amortised.log_q(x, steps=ev.logq_steps, sampler=sampler, log_lik=self.log_lik)

    def log_lik(self, x: Tensor, z: Tensor) -> Tensor:
        """The E-step's tempered log-likelihood ``log p(x|z) / beta``, which a guided score net reads (§4)."""
        return self.decoder.log_prob(x, z) / self.beta

    def encoder_nfe(self) -> int:
        return self.amortised.nfe(self.cfg.eval.sampler, self.cfg.eval.sampler_steps)
