"""Networks: the decoders (Gaussian, Bernoulli), the Gaussian encoder head, the conditional score network.

Vectors are ``(N, D)``; images travel flattened (``C*H*W``, values in [0, 1]) and are reshaped
here when a module is convolutional. Every module is batch-independent (no batch norm), which the
exact log-density via the sampler's Jacobian relies on (docs/method.md §7). Each network is an
MLP or convolutional (``mlp | conv | auto``): ``auto`` is conv for images of ``CONV_MIN_SIDE`` px and
more, an MLP otherwise (the literature's 784-200-200-d MLP for MNIST; fast on a CPU).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from diffenc_core.config import EncoderConfig, ModelConfig, VAEConfig
from diffenc_core.errors import ConfigError

LOG_2PI = math.log(2.0 * math.pi)
ImageShape = tuple[int, int, int]
CONV_MIN_SIDE = 32  # auto: convolutions for images at least this tall and wide, MLPs below


def sinusoidal_embedding(logsnr: Tensor, dim: int, max_period: float = 100.0) -> Tensor:
    """``(N,) -> (N, dim)`` sin/cos of ``logsnr`` at geometric frequencies ``1 .. 1/max_period``.

    Log-SNR spans about 20 units, so periods from ``2 pi`` to ``2 pi * max_period`` resolve it
    both locally and globally (an odd ``dim`` gets one zero pad column).
    """
    logsnr = torch.as_tensor(logsnr).reshape(-1)
    half = dim // 2
    k = torch.arange(half, device=logsnr.device, dtype=logsnr.dtype)
    freqs = torch.exp(-math.log(max_period) * k / max(half - 1, 1))
    args = logsnr[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """``depth`` hidden SiLU layers of width ``hidden`` then a linear output layer."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _halvings(side: int, max_halvings: int, min_side: int) -> int:
    """How many times ``side`` can be halved exactly while staying >= ``min_side``."""
    k = 0
    while k < max_halvings and side % 2 == 0 and side // 2 >= min_side:
        side //= 2
        k += 1
    return k


class ConvTrunk(nn.Module):
    """Flattened image ``(N, C*H*W) -> (N, out_dim)``: a 3x3 conv, stride-2 convs, a linear head."""

    def __init__(
        self,
        image_shape: ImageShape,
        out_dim: int,
        channels: int = 64,
        max_halvings: int = 3,
        min_side: int = 4,
    ):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        k = min(_halvings(h, max_halvings, min_side), _halvings(w, max_halvings, min_side))
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1), nn.SiLU()]
        for _ in range(k):
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(channels * (h >> k) * (w >> k), out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.convs(x.reshape(x.shape[0], *self.image_shape))
        return self.head(h.flatten(1))


class ConvUpNet(nn.Module):
    """Latent ``(N, d) -> (N, C*H*W)``: an MLP to a small feature map, then upsample+conv blocks."""

    def __init__(
        self,
        latent_dim: int,
        image_shape: ImageShape,
        hidden: int = 256,
        channels: int = 64,
        max_doublings: int = 3,
        min_side: int = 2,
    ):
        super().__init__()
        c, h, w = image_shape
        k = min(_halvings(h, max_doublings, min_side), _halvings(w, max_doublings, min_side))
        self.start = (channels, h >> k, w >> k)
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, math.prod(self.start)),
            nn.SiLU(),
        )
        layers: list[nn.Module] = []
        for _ in range(k):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.SiLU(),
            ]
        layers.append(nn.Conv2d(channels, c, 3, padding=1))
        self.convs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).reshape(z.shape[0], *self.start)
        return self.convs(h).flatten(1)


# ------------------------------------------------------------------------------- architecture
def network_kind(kind: str, image_shape: ImageShape | None, key: str) -> Literal["mlp", "conv"]:
    """``mlp`` or ``conv`` for the setting ``key`` (``auto``: conv for images of ``CONV_MIN_SIDE`` px and more)."""
    if kind == "auto":
        big = image_shape is not None and min(image_shape[1:]) >= CONV_MIN_SIDE
        return "conv" if big else "mlp"
    if kind == "conv" and image_shape is None:
        raise ConfigError(f"{key}: 'conv' needs image data (this dataset has no image shape); use 'mlp'")
    return "conv" if kind == "conv" else "mlp"


# ------------------------------------------------------------------------------------ decoder
def _lead_apply(net: nn.Module, z: Tensor, x_dim: int) -> Tensor:
    """``net`` on ``(..., d)``: leading dims (e.g. particles) are flattened into the batch and kept."""
    lead = z.shape[:-1]
    return net(z.reshape(-1, z.shape[-1])).reshape(*lead, x_dim)


class GaussianDecoder(nn.Module):
    """``p(x|z) = N(f(z), sigma_x^2 I)``; ``sigma_x`` learned (log-scale, clamped) or fixed."""

    likelihood = "gaussian"

    def __init__(
        self,
        net: nn.Module,
        x_dim: int,
        sigma_init: float = 0.1,
        sigma_min: float = 0.01,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.net = net
        self.x_dim = x_dim
        self.sigma_min = sigma_min
        log_sigma = torch.tensor(math.log(sigma_init))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def mean(self, z: Tensor) -> Tensor:
        """``f(z)``: ``(..., d) -> (..., D)`` (leading dims, e.g. particles, are kept)."""
        return _lead_apply(self.net, z, self.x_dim)

    def sigma(self) -> Tensor:
        """The observation std, a scalar tensor, never below ``sigma_min``."""
        return self.log_sigma.exp().clamp(min=self.sigma_min)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """``log N(x; f(z), sigma^2 I)`` in nats per example: ``x (N, D)``, ``z (..., N, d)`` ->
        ``(..., N)``."""
        sigma = self.sigma()
        sq = ((x - self.mean(z)) / sigma).pow(2).sum(-1)
        return -0.5 * sq - self.x_dim * (torch.log(sigma) + 0.5 * LOG_2PI)


class BernoulliDecoder(nn.Module):
    """``p(x|z) = prod_i Bernoulli(x_i; sigmoid(f_i(z)))`` for binary pixels (docs/method.md §1).

    ``log_prob`` sums over pixels, so numbers are nats per image as in the literature; ``mean`` is the
    pixel probabilities (what a reconstruction shows).
    """

    likelihood = "bernoulli"

    def __init__(self, net: nn.Module, x_dim: int):
        super().__init__()
        self.net = net
        self.x_dim = x_dim

    def logits(self, z: Tensor) -> Tensor:
        return _lead_apply(self.net, z, self.x_dim)

    def mean(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(z))

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """``sum_i x_i l_i - softplus(l_i)``, logits ``l = f(z)``: ``x (N, D)``, ``z (..., N, d)`` -> ``(..., N)``."""
        logits = self.logits(z)
        return (x * logits - F.softplus(logits)).sum(-1)


Decoder = GaussianDecoder | BernoulliDecoder


def build_decoder(
    model_cfg: ModelConfig,
    x_dim: int,
    image_shape: ImageShape | None = None,
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian",
    conv_channels: int = 64,
) -> Decoder:
    """The decoder of ``model_cfg.decoder`` with the given likelihood (``Config.likelihood`` resolves ``auto``).

    ``image_shape`` is ``(C, H, W)`` of the flattened ``x``, or None for vector data.
    """
    cfg = model_cfg.decoder
    if network_kind(cfg.kind, image_shape, "model.decoder.kind") == "conv":
        assert image_shape is not None
        if math.prod(image_shape) != x_dim:
            raise ValueError(f"image_shape {tuple(image_shape)} does not match x_dim {x_dim}")
        net: nn.Module = ConvUpNet(model_cfg.latent_dim, image_shape, cfg.hidden, conv_channels)
    else:
        net = mlp(model_cfg.latent_dim, cfg.hidden, cfg.depth, x_dim)
    if likelihood == "bernoulli":
        return BernoulliDecoder(net, x_dim)
    return GaussianDecoder(net, x_dim, cfg.sigma_init, cfg.sigma_min, cfg.learn_sigma)


# ------------------------------------------------------------------------------- encoder head
class GaussianEncoderNet(nn.Module):
    """``x -> (mu, log_std)`` of ``N(mu, diag std^2)``: the VAE encoder and the diffusion base head.

    ``zero_init`` zeroes the last layer so the initial output is the prior (``mu=0``, ``std=1``).
    """

    def __init__(
        self,
        x_dim: int,
        latent_dim: int,
        hidden: int = 256,
        depth: int = 2,
        image_shape: ImageShape | None = None,
        zero_init: bool = False,
        conv_channels: int = 64,
    ):
        """A conv trunk when ``image_shape`` is given, else an MLP on the flat vector."""
        super().__init__()
        self.latent_dim = latent_dim
        if image_shape is not None:
            trunk = ConvTrunk(image_shape, hidden, conv_channels)
            self.net = nn.Sequential(
                trunk, nn.SiLU(), mlp(hidden, hidden, depth - 1, 2 * latent_dim)
            )
        else:
            self.net = mlp(x_dim, hidden, depth, 2 * latent_dim)
        if zero_init:
            last = self.net[-1] if image_shape is None else self.net[-1][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @classmethod
    def from_config(
        cls,
        x_dim: int,
        latent_dim: int,
        vae_cfg: VAEConfig,
        image_shape: ImageShape | None = None,
        zero_init: bool = False,
    ) -> GaussianEncoderNet:
        """The trunk ``model.vae.kind`` chooses (the VAE's encoder and the diffusion encoder's head)."""
        conv = network_kind(vae_cfg.kind, image_shape, "model.vae.kind") == "conv"
        return cls(x_dim, latent_dim, vae_cfg.hidden, vae_cfg.depth, image_shape if conv else None, zero_init)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_std = self.net(x).chunk(2, dim=-1)
        return mu, log_std


# --------------------------------------------------------------------------------- score net
class _FiLMBlock(nn.Module):
    """Pre-norm residual MLP block; the conditioning vector sets a per-feature scale and shift."""

    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, film: Tensor) -> Tensor:
        """``film``: ``self.film(cond)``, the scale and shift (computed in parts by the score net)."""
        scale, shift = film.chunk(2, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        y = self.fc2(self.act(self.fc1(self.act(y))))
        return h + y


class ScoreNet(nn.Module):
    """The residual ``r_phi(z_t, logsnr, x) -> (N, d)`` of the encoder's eps-prediction (§4, §9).

    Conditioning: ``[z_t, x-embedding, time-embedding]`` concatenated at the input, plus FiLM
    in every residual block from the summed embeddings. The output layer is zero-initialised,
    so an untrained net returns 0 (the encoder is then exactly its base / the prior).
    """

    def __init__(
        self,
        x_dim: int,
        latent_dim: int,
        hidden: int = 256,
        blocks: int = 3,
        time_embed_dim: int = 64,
        x_embed_dim: int = 128,
        image_shape: ImageShape | None = None,
        conv_channels: int = 64,
        max_period: float = 100.0,
        guided: bool = False,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.time_embed_dim = time_embed_dim
        self.max_period = max_period
        if image_shape is not None:
            self.x_net: nn.Module = ConvTrunk(image_shape, x_embed_dim, conv_channels)
        else:
            self.x_net = mlp(x_dim, hidden, 1, x_embed_dim)
        self.t_net = mlp(time_embed_dim, hidden, 1, hidden)
        self.x_cond = nn.Linear(x_embed_dim, hidden)
        self.inp = nn.Linear(latent_dim + x_embed_dim + time_embed_dim, hidden)
        self.blocks = nn.ModuleList(_FiLMBlock(hidden, hidden) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, latent_dim)
        # the log-target's gradient at the denoised guess, an input beside z_t (docs/method.md §4)
        self.guide = nn.Linear(latent_dim, hidden, bias=False) if guided else None
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @classmethod
    def from_config(
        cls,
        x_dim: int,
        latent_dim: int,
        enc_cfg: EncoderConfig,
        image_shape: ImageShape | None = None,
    ) -> ScoreNet:
        """The x-network ``model.encoder.x_net`` chooses."""
        conv = network_kind(enc_cfg.x_net, image_shape, "model.encoder.x_net") == "conv"
        return cls(
            x_dim,
            latent_dim,
            enc_cfg.hidden,
            enc_cfg.blocks,
            enc_cfg.time_embed_dim,
            enc_cfg.x_embed_dim,
            image_shape if conv else None,
            guided=enc_cfg.guidance == "likelihood",
        )

    def embed_x(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """What the network needs of ``x``, computed once per sampler call: the x-embedding's share of the input
        layer and of every block's FiLM (the layers are linear in their input, so a step then costs only the z
        and time parts: one time row when the whole batch shares a log-SNR). Those shares are linear maps of the
        x-network's last hidden layer, composed into one matrix: one product per x instead of four."""
        hidden, last = self._x_hidden(x)
        d, e = self.latent_dim, last.out_features
        w_in, w_cond = self.inp.weight[:, d : d + e] @ last.weight, self.x_cond.weight @ last.weight
        b_in = self.inp.weight[:, d : d + e] @ last.bias + self.inp.bias
        b_cond = self.x_cond.weight @ last.bias + self.x_cond.bias
        weight = torch.cat([w_in, *(block.film.weight @ w_cond for block in self.blocks)])
        bias = torch.cat([b_in, *(block.film.weight @ b_cond + block.film.bias for block in self.blocks)])
        x_in, *films = F.linear(hidden, weight, bias).split([w_in.shape[0]] + [2 * w_in.shape[0]] * len(self.blocks),
                                                            dim=-1)
        return x_in, films

    def _x_hidden(self, x: Tensor) -> tuple[Tensor, nn.Linear]:
        """The x-network's last hidden layer and its final (linear) layer."""
        if isinstance(self.x_net, ConvTrunk):
            return self.x_net.convs(x.reshape(x.shape[0], *self.x_net.image_shape)).flatten(1), self.x_net.head
        return self.x_net[:-1](x), self.x_net[-1]

    def forward(
        self, z_t: Tensor, logsnr: Tensor, x: Tensor | None = None, x_emb: tuple[Tensor, list[Tensor]] | None = None,
        guide: Tensor | None = None,
    ) -> Tensor:
        if x_emb is None:
            if x is None:
                raise ValueError("ScoreNet needs x or its embedding x_emb")
            x_emb = self.embed_x(x)
        x_in, x_films = x_emb
        lam = torch.as_tensor(logsnr, dtype=z_t.dtype, device=z_t.device).reshape(-1)
        if lam.numel() > 1 and lam.stride(0) == 0:  # one log-SNR broadcast over the batch (a sampler step)
            lam = lam[:1]
        t_feat = sinusoidal_embedding(lam, self.time_embed_dim, self.max_period)  # (1 or N, time_embed_dim)
        d, t0 = self.latent_dim, self.inp.in_features - self.time_embed_dim
        # inp(cat[z_t, x_emb, t_feat]) and film(t_net(t) + x_cond) as sums of their parts
        h = F.linear(z_t, self.inp.weight[:, :d]) + x_in + F.linear(t_feat, self.inp.weight[:, t0:])
        if self.guide is not None:
            if guide is None:
                raise ValueError("a guided ScoreNet needs the guidance gradient")
            h = h + self.guide(guide)
        t_cond = self.t_net(t_feat)
        for block, x_film in zip(self.blocks, x_films, strict=True):
            h = block(h, x_film + F.linear(t_cond, block.film.weight))
        return self.out(F.silu(self.out_norm(h)))
