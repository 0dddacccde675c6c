"""The diffusion encoder ``q_phi(z|x)``: a conditional diffusion model over the latent (§4, §9).

The eps-prediction is the *residual from a base*: ``eps_hat = eps_base + r_phi`` with a
zero-initialised ``r_phi``, so an untrained encoder is exactly the prior ``N(0, I)``:

* ``none``: the base is the prior, ``eps_base = sigma z_t``.
* ``gaussian``: the base is ``N(mu(x), diag std(x)^2)`` diffused to ``(alpha, sigma)``, in closed
  form; its zero-initialised head starts at the prior and learns through the same eps-MSE.
* ``whitened``: the diffusion runs on ``u = (z - mu(x)) / std(x)`` with the prior's base; the head
  is fitted by the Gaussian NLL of the targets and samples are ``z = mu + std u``.

A guided encoder (``model.encoder.guidance: likelihood``) also feeds ``r_phi`` the posterior's score through the
decoder at the denoised guess (docs/method.md §4): every call then takes the decoder's tempered ``log_lik``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffenc_core.config import EncoderConfig, ModelConfig, VAEConfig
from diffenc_core.networks import LOG_2PI, GaussianEncoderNet, ImageShape, ScoreNet
from diffenc_core.rate import log_q_deterministic, score_integral, std_normal_log_prob
from diffenc_core.sampling import DETERMINISTIC_SAMPLERS, SAMPLERS, EpsFn, ancestral
from diffenc_core.schedule import LogSNRSchedule

LogLik = Callable[[Tensor, Tensor], Tensor]  # (x, z) -> the tempered log p(x|z)^(1/beta) per row


class DiffusionEncoder(nn.Module):
    """``q_phi(z|x)``: a ScoreNet residual on top of a prior / Gaussian / whitened base."""

    def __init__(
        self,
        x_dim: int,
        latent_dim: int,
        enc_cfg: EncoderConfig,
        vae_cfg: VAEConfig,
        image_shape: ImageShape | None = None,
        zero_head: bool = True,
    ):
        """``zero_head``: the head starts at the prior (EM from scratch); else it is initialised
        exactly like the VAE baseline's encoder, for a VAE phase that reproduces the baseline."""
        super().__init__()
        self.x_dim = x_dim
        self.latent_dim = latent_dim
        self.base = enc_cfg.base
        self.schedule = LogSNRSchedule.from_config(enc_cfg)
        self.head: GaussianEncoderNet | None = None
        if self.base != "none":
            self.head = GaussianEncoderNet.from_config(
                x_dim, latent_dim, vae_cfg, image_shape, zero_init=zero_head
            )
        # the score net draws its initial weights from a stream of its own, so the global stream
        # goes on to the decoder exactly as in the VAE baseline (head, then decoder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            self.score = ScoreNet.from_config(x_dim, latent_dim, enc_cfg, image_shape)

    @classmethod
    def from_config(
        cls,
        model_cfg: ModelConfig,
        x_dim: int,
        image_shape: ImageShape | None = None,
        zero_head: bool = True,
    ) -> DiffusionEncoder:
        return cls(x_dim, model_cfg.latent_dim, model_cfg.encoder, model_cfg.vae, image_shape, zero_head)

    # ------------------------------------------------------------------------------ eps
    def _eps(
        self, z_t: Tensor, logsnr: Tensor, x_emb: Tensor, mu: Tensor | None, var: Tensor | None,
        guide: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> Tensor:
        lam = torch.as_tensor(logsnr, dtype=z_t.dtype, device=z_t.device).reshape(-1)
        lam = lam.expand(z_t.shape[0])
        alpha, sigma = (v.unsqueeze(-1) for v in self.schedule.alpha_sigma(lam))
        if self.base == "gaussian":
            # N(mu, var) diffused is N(alpha mu, alpha^2 var + sigma^2); eps = -sigma * its score
            base = sigma * (z_t - alpha * mu) / (alpha**2 * var + sigma**2)
        else:
            base = sigma * z_t  # the prior's own eps (§9)
        g = guide(z_t, alpha) if guide is not None else None
        return base + self.score(z_t, lam, x_emb=x_emb, guide=g)

    @property
    def guided(self) -> bool:
        return self.score.guide is not None

    def _guide(
        self, x: Tensor, log_lik: LogLik | None, white: tuple[Tensor, Tensor] | None = None
    ) -> Callable[[Tensor, Tensor], Tensor] | None:
        """``(z_t, alpha) -> g``: the log-target's gradient ``grad log p(z) p(x|z)^(1/beta)`` at the prior's
        denoised guess ``alpha z_t`` (mapped through the whitening), in the diffusion's own coordinates (§4).
        Differentiable in ``z_t`` when ``z_t`` carries a graph (the exact log q's Jacobian). ``white``: the
        head's ``(mu, log_std)`` when the caller has them (the loss), so the head runs once."""
        if not self.guided:
            return None
        if log_lik is None:
            raise ValueError("model.encoder.guidance: likelihood needs the decoder's log-likelihood")
        mu = std = None
        if self.base == "whitened":
            with torch.no_grad():
                mu, log_std = white if white is not None else self._head(x)
                mu, std = mu.detach(), log_std.exp()  # the loss's head carries a graph; exp here does not

        def guide(z_t: Tensor, alpha: Tensor) -> Tensor:
            graph = z_t.requires_grad
            with torch.enable_grad():
                guess = alpha * (z_t if graph else z_t.detach())
                z = guess if std is None else mu + std * guess
                if not graph:
                    z = z.detach().requires_grad_(True)
                target = log_lik(x, z) - 0.5 * z.pow(2).sum(-1)
                (g,) = torch.autograd.grad(target.sum(), z, create_graph=graph)
            return g if std is None else std * g

        return guide

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.head is None:
            zeros = x.new_zeros(x.shape[0], self.latent_dim)
            return zeros, zeros
        return self.head(x)

    def eps_fn(self, x: Tensor, log_lik: LogLik | None = None) -> EpsFn:
        """Closure ``(z_t, logsnr) -> eps_hat`` over ``x`` (embedded once).

        In the diffusion's own space: ``z`` for the ``none``/``gaussian`` bases, ``u`` for
        ``whitened``. Row ``i`` of ``z_t`` belongs to ``x_i``. ``log_lik``: the decoder's, for a guided net.
        """
        x_emb = self.score.embed_x(x)
        mu = var = None
        if self.base == "gaussian":
            mu, log_std = self._head(x)
            var = torch.exp(2 * log_std)
        guide = self._guide(x, log_lik)

        def fn(z_t: Tensor, logsnr: Tensor) -> Tensor:
            return self._eps(z_t, logsnr, x_emb, mu, var, guide)

        return fn

    # ----------------------------------------------------------------------------- loss
    def loss(
        self, x: Tensor, z0: Tensor, generator: torch.Generator | None = None, fit_head: bool = True,
        log_lik: LogLik | None = None,
    ) -> Tensor:
        """The plain eps-prediction loss on pairs ``(x, z0)`` (§3 step 2), a scalar.

        Batch mean of ``||eps_hat - eps||^2`` summed over latent dims, logsnr stratified-uniform
        on ``[min, max]`` (the likelihood / rate weighting, §9). ``whitened`` adds the head's
        Gaussian NLL of ``z0`` (summed over dims, batch mean) unless ``fit_head`` is False (the
        head then learns elsewhere, e.g. by the ELBO); its eps targets ``u`` use the detached head.
        """
        n = x.shape[0]
        lam = self.schedule.sample_logsnr(n, generator, x.device).to(z0.dtype)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        alpha, sigma = (v.unsqueeze(-1) for v in self.schedule.alpha_sigma(lam))
        x_emb = self.score.embed_x(x)
        nll = z0.new_zeros(())
        mu = var = white = None
        target = z0
        if self.base == "gaussian":
            mu, log_std = self._head(x)
            var = torch.exp(2 * log_std)
        elif self.base == "whitened":
            mu, log_std = self._head(x)
            if fit_head:
                nll = 0.5 * ((z0 - mu) * torch.exp(-log_std)).pow(2) + log_std + 0.5 * LOG_2PI
                nll = nll.sum(-1).mean()
            target = (z0 - mu.detach()) * torch.exp(-log_std.detach())
            white = mu, log_std
            mu = None
        z_t = alpha * target + sigma * noise
        eps_hat = self._eps(z_t, lam, x_emb, mu, var, self._guide(x, log_lik, white))
        return (eps_hat - noise).pow(2).sum(-1).mean() + nll

    # -------------------------------------------------------------------------- sampling
    def _noise(self, x: Tensor, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
        if noise is not None:
            return noise
        shape = (x.shape[0], self.latent_dim)
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)

    def _whiten_params(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        return self._head(x) if self.base == "whitened" else None

    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        steps: int = 10,
        sampler: str = "dpmpp2m",
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        log_lik: LogLik | None = None,
    ) -> Tensor:
        """``z ~ q(z|x)``, ``(N, d)``, from ``noise`` (or fresh ``N(0, I)``); no gradients."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        eps_fn = self.eps_fn(x, log_lik)
        z_T = self._noise(x, generator, noise)
        if sampler == "ancestral":
            u, _ = ancestral(eps_fn, z_T, self.schedule, steps, generator)
        else:
            u = DETERMINISTIC_SAMPLERS[sampler](eps_fn, z_T, self.schedule, steps)
        white = self._whiten_params(x)
        if white is None:
            return u
        mu, log_std = white
        return mu + torch.exp(log_std) * u

    @torch.no_grad()
    def sample_with_rate(
        self,
        x: Tensor,
        steps: int = 100,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        log_lik: LogLik | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(z, R (N,))``: ancestral samples and the free upper bound on their rate (§5).

        For ``whitened``, ``R`` is the path bound on ``KL(q(u|x) || N(0, I))`` plus the one-sample
        change-of-variables term ``log N(u) - sum log std - log N(mu + std u)`` (§9), unbiased
        for the remaining part of the rate.
        """
        u, rate = ancestral(
            self.eps_fn(x, log_lik), self._noise(x, generator, noise), self.schedule, steps, generator
        )
        white = self._whiten_params(x)
        if white is None:
            return u, rate
        mu, log_std = white
        z = mu + torch.exp(log_std) * u
        rate = rate + std_normal_log_prob(u) - log_std.sum(-1) - std_normal_log_prob(z)
        return z, rate

    def log_q(
        self,
        x: Tensor,
        noise: Tensor | None = None,
        steps: int = 10,
        sampler: str = "dpmpp2m",
        generator: torch.Generator | None = None,
        log_lik: LogLik | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(z, log q(z|x))`` exactly for the deterministic sampler, via its Jacobian (``d`` backward passes).

        Includes the whitening log-det ``-sum log std``. Evaluation only: outputs are detached.
        """
        z_T = self._noise(x, generator, noise)
        with torch.no_grad():
            white = self._whiten_params(x)
        u, log_q = log_q_deterministic(self.eps_fn(x, log_lik), z_T, self.schedule, steps, sampler)
        if white is None:
            return u, log_q.detach()
        mu, log_std = white
        return mu + torch.exp(log_std) * u, (log_q - log_std.sum(-1)).detach()

    def score_integral(
        self,
        x: Tensor,
        z0: Tensor,
        n_logsnr: int = 64,
        generator: torch.Generator | None = None,
        log_lik: LogLik | None = None,
    ) -> Tensor:
        """Forward-form rate diagnostic on ``z0`` (§5), ``(N,)``, no gradients.

        For ``whitened`` it is the score integral on ``u`` plus the change-of-variables term at
        ``z0``; like the path bound this is the rate when ``z0 ~ q(z|x)``.
        """
        with torch.no_grad():
            eps_fn = self.eps_fn(x, log_lik)
            white = self._whiten_params(x)
            if white is None:
                return score_integral(eps_fn, z0, self.schedule, n_logsnr, generator)
            mu, log_std = white
            u = (z0 - mu) * torch.exp(-log_std)
            rate = score_integral(eps_fn, u, self.schedule, n_logsnr, generator)
            return rate + std_normal_log_prob(u) - log_std.sum(-1) - std_normal_log_prob(z0)

    @staticmethod
    def nfe(sampler: str = "dpmpp2m", steps: int = 10) -> int:
        """Network evaluations per sample: every sampler here uses one per step."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        return steps
