"""PNG figures a person looks at: reconstruction grid, latent scatter, training curves, R–D plane."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from diffenc_core.runs import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def reconstruction_grid(
    rows: dict[str, np.ndarray], image_shape: tuple[int, int, int] | None, path: str | Path
) -> Path:
    """One row per kind (original, amortised, refined); images, or line plots for vectors."""
    n = len(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (label, xs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            if image_shape is not None:
                img = xs[c].reshape(image_shape)
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            else:
                ax.plot(xs[c], lw=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    return _save(fig, path)


def latent_scatter(z2: np.ndarray, color: np.ndarray | None, title: str, path: str | Path) -> Path:
    """A 2-D view of the latents, coloured by label or factor."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    sc = ax.scatter(z2[:, 0], z2[:, 1], c=color, s=6, cmap="tab10" if color is not None else None)
    if color is not None:
        fig.colorbar(sc, ax=ax)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def training_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Every numeric history column against the step, one panel each."""
    cols = [c for c in history.columns if c not in ("step", "epoch") and history[c].notna().any()]
    ncol = 3
    nrow = max(1, -(-len(cols) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(11, 2.4 * nrow), squeeze=False)
    for ax, col in zip(axes.flat, cols, strict=False):
        sub = history[["step", col]].dropna()
        ax.plot(sub["step"], sub[col], lw=1)
        ax.set_title(col, fontsize=8)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def rate_distortion(table: pd.DataFrame, path: str | Path) -> Path:
    """Runs as points in the rate–distortion plane, coloured by method, labelled by beta."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, sub in table.groupby("method"):
        ax.scatter(sub["rate_nats"], sub["distortion_nats"], label=method)
        for _, r in sub.iterrows():
            ax.annotate(f"β={r['beta']:g}", (r["rate_nats"], r["distortion_nats"]), fontsize=7)
    ax.set_xlabel("rate (nats)")
    ax.set_ylabel("distortion −E log p(x|z) (nats)")
    ax.legend()
    return _save(fig, path)


def posterior_samples(enc: np.ndarray, exact: np.ndarray, title: str, path: str | Path) -> Path:
    """Encoder samples against exact posterior samples for one x (2-D latents)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(exact[:, 0], exact[:, 1], s=4, alpha=0.4, label="exact posterior")
    ax.scatter(enc[:, 0], enc[:, 1], s=4, alpha=0.4, label="encoder")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
