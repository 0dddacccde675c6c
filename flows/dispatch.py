"""Run an entry point directly, or as a Prefect flow run when a Prefect server is configured.

With ``PREFECT_API_URL`` set (and ``DIFFENC_PREFECT`` not ``0``) the CLI and the DVC stages go
through the Prefect flows, so their runs appear in the Prefect UI; otherwise they call the same
entry points in-process, with no server and no start-up cost.
"""

from __future__ import annotations

import os
from typing import Any

from diffenc_core.config import Config
from flows import entry


def use_prefect() -> bool:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a rank of a torchrun job: never a flow run of its own
        return False
    flag = os.environ.get("DIFFENC_PREFECT", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return bool(os.environ.get("PREFECT_API_URL"))


def call(name: str, cfg: Config, **kwargs: Any) -> Any:
    """``name`` is one of prepare / train / evaluate; the flow gets ``cfg`` itself (validated once, here)."""
    if use_prefect():
        from flows.prefect_flows import FLOWS

        return FLOWS[name](config=cfg, **kwargs)
    return getattr(entry, f"{name}_entry")(cfg, **kwargs)
