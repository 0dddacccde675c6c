"""The encoder's VP / Ornstein–Uhlenbeck noise schedule in log-SNR (docs/method.md §4, §9).

``z_t = alpha z_0 + sigma eps`` with ``alpha^2 = sigmoid(logsnr)``, ``sigma^2 = sigmoid(-logsnr)``:
variance preserving, so the stationary law is the prior ``N(0, I)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffenc_core.config import EncoderConfig


@dataclass(frozen=True)
class LogSNRSchedule:
    """Log-SNR range ``[logsnr_min, logsnr_max]``: ``logsnr_min`` is the noisiest end."""

    logsnr_min: float = -8.0
    logsnr_max: float = 12.0

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError("logsnr_min must be below logsnr_max")

    @classmethod
    def from_config(cls, enc_cfg: EncoderConfig) -> LogSNRSchedule:
        return cls(logsnr_min=enc_cfg.logsnr_min, logsnr_max=enc_cfg.logsnr_max)

    @property
    def width(self) -> float:
        """Length of the log-SNR interval (the rate integral's measure, docs/method.md §9)."""
        return self.logsnr_max - self.logsnr_min

    def alpha_sigma(self, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` with ``alpha^2 + sigma^2 = 1``, same shape as ``logsnr``."""
        logsnr = torch.as_tensor(logsnr)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def sample_logsnr(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` stratified-uniform log-SNR draws: one per equal-width stratum, shuffled."""
        perm = torch.randperm(n, generator=generator, device=device)
        u = (perm + torch.rand(n, generator=generator, device=device)) / n
        return self.logsnr_min + self.width * u

    def grid(
        self,
        steps: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``steps + 1`` uniform log-SNR values from ``logsnr_min`` (noisiest) to ``logsnr_max``."""
        if steps < 1:
            raise ValueError("steps must be at least 1")
        return torch.linspace(
            self.logsnr_min, self.logsnr_max, steps + 1, device=device, dtype=dtype
        )
