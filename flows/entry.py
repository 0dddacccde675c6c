"""The entry points shared by the CLI, the DVC stages and the Prefect tasks (one implementation).

Each takes a validated ``Config`` and returns a path, so callers pass paths, not tensors.
"""

from __future__ import annotations

from pathlib import Path

from diffenc_core import data
from diffenc_core.config import Config


def prepare_entry(cfg: Config) -> Path:
    """Prepare ``cfg.data`` and return the prepared folder."""
    return data.prepare(cfg.data)
