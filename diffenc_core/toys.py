"""Ground-truth models: fixed decoders whose exact posterior and log p(x) we can compute.

* ``LinearGaussian`` — probabilistic PCA; posterior and evidence in closed form.
* ``Bimodal`` — ``x = (z - c)^2`` as a complex square plus noise: ``z`` and ``2c - z`` give the same
  mean, so the posterior has two modes; evidence and posterior by quadrature on a 2-D grid.

Both use the prior ``N(0, I)`` and expose ``log_lik(x, z)`` in nats, broadcasting over leading
dimensions of ``z`` (particles, samples) against a batch of ``x`` (docs/method.md §7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(x; mean, std^2 I)`` summed over the last dimension."""
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    var = std_t**2
    return -0.5 * (((x - mean) ** 2) / var + torch.log(var) + LOG_2PI).sum(-1)


def std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last dimension."""
    return -0.5 * (z**2 + LOG_2PI).sum(-1)


# ---------------------------------------------------------------------------- linear-Gaussian
@dataclass
class LinearGaussian:
    """``x = W z + b + noise * eps`` with ``z ~ N(0, I)``."""

    W: torch.Tensor  # (D, d)
    b: torch.Tensor  # (D,)
    noise: float

    @property
    def x_dim(self) -> int:
        return self.W.shape[0]

    @property
    def z_dim(self) -> int:
        return self.W.shape[1]

    @classmethod
    def from_posterior_std(
        cls, x_dim: int, posterior_std: list[float], noise: float, seed: int = 0
    ) -> LinearGaussian:
        """Orthogonal columns scaled so the exact posterior std of ``z_i`` is ``posterior_std[i]``."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(x_dim, len(posterior_std), generator=g, dtype=torch.float64))
        s = torch.tensor(posterior_std, dtype=torch.float64)
        # posterior var = noise^2 / (noise^2 + n^2) for a column of norm n
        norms = noise * torch.sqrt(1.0 / s**2 - 1.0)
        W = q * norms
        b = 0.5 * torch.randn(x_dim, generator=g, dtype=torch.float64)
        return cls(W=W.float(), b=b.float(), noise=float(noise))

    def to_dict(self) -> dict[str, Any]:
        return {"W": self.W.tolist(), "b": self.b.tolist(), "noise": self.noise}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearGaussian:
        return cls(W=torch.tensor(d["W"]), b=torch.tensor(d["b"]), noise=float(d["noise"]))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.to(z).T + self.b.to(z)

    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(x, self.mean(z), self.noise)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.z_dim, generator=generator)
        x = self.mean(z) + self.noise * torch.randn(n, self.x_dim, generator=generator)
        return x, z

    def posterior(self, x: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(B, d)`` and covariance ``(d, d)`` of ``q*_beta ∝ p(z) p(x|z)^(1/beta)``."""
        W = self.W.double()
        prec = torch.eye(self.z_dim, dtype=torch.float64) + W.T @ W / (beta * self.noise**2)
        cov = torch.linalg.inv(prec)
        mean = (x.double() - self.b.double()) @ W @ cov / (beta * self.noise**2)
        return mean.to(x.dtype), cov.to(x.dtype)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x) = log N(x; b, W W^T + noise^2 I)``."""
        W = self.W.double()
        cov = W @ W.T + self.noise**2 * torch.eye(self.x_dim, dtype=torch.float64)
        dist = torch.distributions.MultivariateNormal(self.b.double(), covariance_matrix=cov)
        return dist.log_prob(x.double()).to(x.dtype)

    def kl_to_prior(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Exact ``KL(q*_beta(z|x) || N(0, I))`` per example."""
        mean, cov = self.posterior(x, beta)
        d = self.z_dim
        tr = torch.trace(cov)
        logdet = torch.logdet(cov.double()).to(x.dtype)
        return 0.5 * (tr + (mean**2).sum(-1) - d - logdet)

    def score(self, z: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              beta: float = 1.0) -> torch.Tensor:
        """Exact score of the posterior diffused to noise level ``(alpha, sigma)``.

        ``z_t = alpha z + sigma eps`` with ``z ~ N(m, S)`` is ``N(alpha m, alpha^2 S + sigma^2 I)``.
        ``alpha``/``sigma`` broadcast as ``(B, 1)``.
        """
        mean, cov = self.posterior(x, beta)
        a = alpha.reshape(-1, 1, 1)
        s = sigma.reshape(-1, 1, 1)
        eye = torch.eye(self.z_dim, dtype=z.dtype, device=z.device)
        cov_t = a**2 * cov.to(z) + s**2 * eye
        diff = (z - alpha.reshape(-1, 1) * mean.to(z)).unsqueeze(-1)
        return -torch.linalg.solve(cov_t, diff).squeeze(-1)


# ------------------------------------------------------------------------------------ bimodal
@dataclass
class Bimodal:
    """``x = (z - c)^2`` (complex square of ``z1 + i z2``) ``+ noise * eps``, ``z ~ N(0, I_2)``."""

    shift: tuple[float, float] = (0.4, 0.0)
    noise: float = 0.15
    grid_half_width: float = 6.0
    grid_points: int = 241

    x_dim = 2
    z_dim = 2

    def to_dict(self) -> dict[str, Any]:
        return {"shift": list(self.shift), "noise": self.noise}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bimodal:
        return cls(shift=tuple(d["shift"]), noise=float(d["noise"]))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(self.shift, dtype=z.dtype, device=z.device)
        u = z - c
        re = u[..., 0] ** 2 - u[..., 1] ** 2
        im = 2.0 * u[..., 0] * u[..., 1]
        return torch.stack([re, im], dim=-1)

    def log_lik(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(x, self.mean(z), self.noise)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, 2, generator=generator)
        x = self.mean(z) + self.noise * torch.randn(n, 2, generator=generator)
        return x, z

    def grid(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
        """Quadrature nodes ``(G, 2)`` and the cell area."""
        axis = torch.linspace(-self.grid_half_width, self.grid_half_width, self.grid_points, dtype=dtype)
        zz = torch.cartesian_prod(axis, axis)
        step = float(axis[1] - axis[0])
        return zz, step * step

    def log_posterior_grid(
        self, x: torch.Tensor, beta: float = 1.0, chunk: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised ``log p(z) + log p(x|z)/beta + log dA`` on the grid, ``(B, G)``, and the grid."""
        zz, area = self.grid()
        out = []
        xd = x.double()
        prior = std_normal_log_prob(zz)
        mean = self.mean(zz)  # (G, 2)
        for i in range(0, xd.shape[0], chunk):
            xb = xd[i : i + chunk].unsqueeze(1)  # (b, 1, 2)
            ll = gaussian_log_prob(xb, mean.unsqueeze(0), self.noise)  # (b, G)
            out.append(prior + ll / beta + math.log(area))
        return torch.cat(out), zz

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` by quadrature."""
        logw, _ = self.log_posterior_grid(x)
        return torch.logsumexp(logw, dim=1).to(x.dtype)

    def mode_sign(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """+1/-1: which of the two preimages ``c ± sqrt(x)`` (complex) ``z`` lies nearer to."""
        c = torch.tensor(self.shift, dtype=z.dtype, device=z.device)
        xc = torch.complex(x[..., 0].double(), x[..., 1].double())
        root = torch.sqrt(xc)
        u = z - c
        dot = u[..., 0].double() * root.real + u[..., 1].double() * root.imag
        return torch.where(dot >= 0, 1.0, -1.0).to(z.dtype)

    def mode_masses(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """Exact posterior mass of the ``+sqrt(x)`` mode, per example."""
        logw, zz = self.log_posterior_grid(x, beta)
        w = torch.softmax(logw, dim=1)
        signs = self.mode_sign(x.double().unsqueeze(1), zz.unsqueeze(0))
        return (w * (signs > 0)).sum(1).to(x.dtype)

    def posterior_samples(self, x: torch.Tensor, n: int, beta: float = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, B, 2)`` exact posterior samples: grid cell by its mass, then uniform in the cell."""
        logw, zz = self.log_posterior_grid(x, beta)
        idx = torch.multinomial(torch.softmax(logw, 1), n, replacement=True, generator=generator)
        step = 2 * self.grid_half_width / (self.grid_points - 1)
        jitter = (torch.rand(*idx.shape, 2, generator=generator, dtype=torch.float64) - 0.5) * step
        return (zz[idx] + jitter).permute(1, 0, 2).to(x.dtype)


def toy_from_manifest(manifest: dict[str, Any]) -> LinearGaussian | Bimodal | None:
    """The ground-truth model recorded in a prepared dataset's manifest, if any."""
    truth = manifest.get("ground_truth")
    if not truth:
        return None
    if truth["kind"] == "linear_gaussian":
        return LinearGaussian.from_dict(truth)
    if truth["kind"] == "bimodal":
        return Bimodal.from_dict(truth)
    return None


class ToyDecoder(torch.nn.Module):
    """A known toy decoder with the interface of ``networks.GaussianDecoder`` (no parameters).

    Used with ``model.decoder.kind: truth`` to train and check an encoder against the exact
    posterior of the decoder that generated the data.
    """

    def __init__(self, truth: LinearGaussian | Bimodal):
        super().__init__()
        self.truth = truth
        self.x_dim = truth.x_dim

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return self.truth.mean(z)

    def sigma(self) -> torch.Tensor:
        return torch.tensor(self.truth.noise)

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.truth.log_lik(x, z)
