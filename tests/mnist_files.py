"""Tiny MNIST-format IDX files, written where torchvision looks for them (tests never need the real ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_idx(n_train: int = 36, n_test: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28 x 28 images (a few rows at exactly 0 and 255) and labels 0-9, keyed by file name."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_train + n_test, 28, 28), dtype=np.uint8)
    images[:, :4] = 0  # the exact ends of the range: 0 and 255 stay 0 and 1
    images[:, -4:] = 255
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    return dict(zip(IDX_FILES, (images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]), strict=True))


def write_raw(raw_dir: Path, folder: str = "MNIST", **kw) -> dict[str, np.ndarray]:
    """Tiny IDX files where torchvision looks for them: ``<raw_dir>/<folder>/raw/``."""
    arrays = tiny_idx(**kw)
    raw = raw_dir / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (raw / name).write_bytes(idx_bytes(arr))
    return arrays
