"""Decoder, Gaussian encoder head and score network: shapes, densities, initial states."""

from __future__ import annotations

import math

import pytest
import torch

from diffenc_core.config import DecoderConfig, EncoderConfig, ModelConfig, VAEConfig
from diffenc_core.errors import ConfigError
from diffenc_core.networks import (
    GaussianEncoderNet,
    ScoreNet,
    build_decoder,
    sinusoidal_embedding,
)

torch.set_num_threads(1)


def small_model_cfg(**decoder) -> ModelConfig:
    return ModelConfig(latent_dim=3, decoder=DecoderConfig(hidden=32, depth=2, **decoder))


def test_sinusoidal_embedding_shapes_and_range():
    lam = torch.linspace(-8, 12, 5)
    emb = sinusoidal_embedding(lam, 16)
    assert emb.shape == (5, 16) and emb.abs().max() <= 1
    assert sinusoidal_embedding(lam, 7).shape == (5, 7)
    assert not torch.allclose(emb[0], emb[1])


def test_mlp_decoder_log_prob_is_the_gaussian_density():
    dec = build_decoder(small_model_cfg(sigma_init=0.3), x_dim=5)
    z, x = torch.randn(4, 3), torch.randn(4, 5)
    mean = dec.mean(z)
    assert mean.shape == (4, 5) and dec.sigma().shape == ()
    s = 0.3
    by_hand = (-((x - mean) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(dec.log_prob(x, z), by_hand)
    # leading particle dimensions broadcast against the batch of x
    zp = torch.randn(6, 4, 3)
    assert dec.mean(zp).shape == (6, 4, 5) and dec.log_prob(x, zp).shape == (6, 4)
    torch.testing.assert_close(dec.log_prob(x, zp)[2], dec.log_prob(x, zp[2]))


def test_decoder_sigma_learned_clamped_or_fixed():
    dec = build_decoder(small_model_cfg(sigma_init=0.2, sigma_min=0.05), x_dim=4)
    assert dec.log_sigma.requires_grad
    torch.testing.assert_close(dec.sigma(), torch.tensor(0.2))
    with torch.no_grad():
        dec.log_sigma.fill_(-10.0)
    torch.testing.assert_close(dec.sigma(), torch.tensor(0.05))
    fixed = build_decoder(small_model_cfg(learn_sigma=False, sigma_init=0.2), x_dim=4)
    assert all(p is not fixed.log_sigma for p in fixed.parameters())
    torch.testing.assert_close(fixed.sigma(), torch.tensor(0.2))


@pytest.mark.parametrize(
    ("shape", "kind", "conv"),
    [
        ((1, 8, 8), "conv", True),
        ((1, 8, 8), "auto", False),
        ((1, 16, 16), "auto", False),
        ((1, 28, 28), "auto", False),
        ((1, 28, 28), "mlp", False),
        ((3, 32, 32), "auto", True),
        ((1, 28, 28), "conv", True),
    ],
)
def test_image_decoders(shape, kind, conv):
    x_dim = math.prod(shape)
    dec = build_decoder(small_model_cfg(kind=kind), x_dim, image_shape=shape)
    assert any(isinstance(m, torch.nn.Conv2d) for m in dec.modules()) == conv
    z = torch.randn(2, 3)
    assert dec.mean(z).shape == (2, x_dim)
    assert dec.log_prob(torch.rand(2, x_dim), z).shape == (2,)


def test_conv_decoder_needs_an_image_shape():
    with pytest.raises(ConfigError, match="model.decoder.kind: 'conv' needs image data"):
        build_decoder(small_model_cfg(kind="conv"), x_dim=64)


def test_bernoulli_decoder_log_prob_is_the_summed_pixel_likelihood():
    dec = build_decoder(small_model_cfg(), x_dim=6, likelihood="bernoulli")
    assert dec.likelihood == "bernoulli" and not hasattr(dec, "sigma")
    z = torch.randn(4, 3)
    x = torch.bernoulli(torch.full((4, 6), 0.3))
    p = dec.mean(z)
    by_hand = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    torch.testing.assert_close(dec.log_prob(x, z), by_hand)
    exact = torch.distributions.Bernoulli(logits=dec.logits(z)).log_prob(x).sum(-1)
    torch.testing.assert_close(dec.log_prob(x, z), exact)
    zp = torch.randn(5, 4, 3)
    assert dec.log_prob(x, zp).shape == (5, 4)
    torch.testing.assert_close(dec.log_prob(x, zp)[1], dec.log_prob(x, zp[1]))


@pytest.mark.parametrize(("vae_kind", "x_net", "conv_head", "conv_x"), [
    ("auto", "auto", False, False), ("conv", "mlp", True, False), ("mlp", "conv", False, True)])
def test_encoder_networks_follow_their_kind(vae_kind, x_net, conv_head, conv_x):
    shape = (1, 28, 28)
    head = GaussianEncoderNet.from_config(784, 3, VAEConfig(hidden=16, depth=2, kind=vae_kind), shape)
    score = ScoreNet.from_config(784, 3, EncoderConfig(hidden=16, x_embed_dim=8, x_net=x_net), shape)
    assert any(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == conv_head
    assert any(isinstance(m, torch.nn.Conv2d) for m in score.modules()) == conv_x
    assert head(torch.rand(2, 784))[0].shape == (2, 3)


@pytest.mark.parametrize("image_shape", [None, (1, 8, 8)])
def test_gaussian_encoder_net_zero_init_is_the_prior(image_shape):
    vae = VAEConfig(hidden=32, depth=2)
    head = GaussianEncoderNet.from_config(64, 3, vae, image_shape, zero_init=True)
    mu, log_std = head(torch.rand(5, 64))
    assert mu.shape == log_std.shape == (5, 3)
    assert mu.abs().max() == 0 and log_std.abs().max() == 0
    mu, _ = GaussianEncoderNet.from_config(64, 3, vae, image_shape)(torch.rand(5, 64))
    assert mu.abs().max() > 0


@pytest.mark.parametrize("image_shape", [None, (1, 8, 8), (3, 16, 16)])
def test_score_net_shapes_zero_output_and_embedding_reuse(image_shape):
    x_dim = math.prod(image_shape) if image_shape else 10
    cfg = EncoderConfig(hidden=32, blocks=2, time_embed_dim=16, x_embed_dim=8, guidance="none")
    net = ScoreNet.from_config(x_dim, 4, cfg, image_shape)
    x, z = torch.rand(6, x_dim), torch.randn(6, 4)
    lam = torch.linspace(-8, 12, 6)
    assert net(z, lam, x=x).abs().max() == 0  # zero-initialised output layer
    torch.nn.init.normal_(net.out.weight)
    out = net(z, lam, x=x)
    assert out.shape == (6, 4) and out.abs().max() > 0
    torch.testing.assert_close(net(z, lam, x_emb=net.embed_x(x)), out)
    torch.testing.assert_close(net(z, torch.tensor(2.0), x=x), net(z, torch.full((6,), 2.0), x=x))
    # batch independence (needed by the exact log q via the Jacobian)
    z2 = z.clone()
    z2[1:] += 1.0
    torch.testing.assert_close(net(z2, lam, x=x)[0], out[0])


def test_score_net_computes_x_once_and_one_time_row_for_a_shared_log_snr():
    """The split input layer and a broadcast log-SNR give the network's plain formula, row for row."""
    torch.manual_seed(0)
    net = ScoreNet(x_dim=6, latent_dim=3, hidden=16, blocks=2, time_embed_dim=8, x_embed_dim=5)
    torch.nn.init.normal_(net.out.weight)  # not the zero-initialised output: compare real values
    x, z = torch.randn(4, 6), torch.randn(4, 3)

    def plain(lam: torch.Tensor) -> torch.Tensor:
        h_x = net.x_net(x)
        t = sinusoidal_embedding(lam, 8)
        h = net.inp(torch.cat([z, h_x, t], dim=-1))
        cond = net.t_net(t) + net.x_cond(h_x)
        for block in net.blocks:
            h = block(h, block.film(cond))
        return net.out(torch.nn.functional.silu(net.out_norm(h)))

    per_row = torch.tensor([-3.0, 0.0, 2.0, 9.0])
    torch.testing.assert_close(net(z, per_row, x=x), plain(per_row))
    shared = torch.tensor(1.5).expand(4)
    torch.testing.assert_close(net(z, shared, x=x), plain(torch.full((4,), 1.5)))
    torch.testing.assert_close(net(z, shared, x_emb=net.embed_x(x)), plain(torch.full((4,), 1.5)))
