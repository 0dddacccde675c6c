"""Honest checkpoints: everything needed to resume bit-identically, written atomically, loaded safely.

A checkpoint holds model and optimiser state, the step, the RNG states, the persistent Langevin
chains and step sizes, and the resolved configuration. It is loaded with ``weights_only=True``
(no pickle of anything a user hands us) and checked for our own format marker.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from diffenc_core.errors import CheckpointError
from diffenc_core.runs import atomic_path

FORMAT = "diffenc-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and, when present, CUDA)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(obj: Any) -> bool:
    """True if every floating tensor inside ``obj`` (nested dicts/lists) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(all_finite(v) for v in obj)
    return True


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus format marker) to ``path`` atomically; refuse non-finite values.

    Serialised in memory first, so a full disk is an OSError on the plain write (a StorageError
    naming the file, the previous checkpoint intact), not torch's cryptic zip-writer error.
    """
    if not all_finite(payload):
        raise CheckpointError(f"{path}: refusing to write a checkpoint with NaN or infinite values")
    body = {"format": FORMAT, "version": VERSION, **payload}
    buffer = io.BytesIO()
    torch.save(body, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint we wrote; a missing, corrupt or foreign file raises CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    return _parse(p, p, map_location)


def read(path: str | Path) -> bytes:
    """A checkpoint's bytes, unparsed: rank 0 of a job reads the file once and sends them to every rank."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        return p.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{p}: cannot be read ({err.strerror})") from None


def loads(blob: bytes, path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Parse the bytes :func:`read` returned for ``path`` (named in errors), checked as :func:`load` does."""
    return _parse(io.BytesIO(blob), Path(path), map_location)


def _parse(source: Path | io.BytesIO, p: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # a legacy pickle's protocol warning: the one line below says it all
            warnings.simplefilter("ignore")
            body = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{p}: not a readable diffenc checkpoint ({err.__class__.__name__}); "
            "it may be truncated or come from another program"
        ) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a diffenc checkpoint (no '{FORMAT}' marker)")
    if body.get("version") != VERSION:
        raise CheckpointError(f"{p}: checkpoint format version {body.get('version')} is not {VERSION}")
    return body
