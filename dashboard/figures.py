"""Pure helpers for the dashboard: array shaping, PCA, the Pareto front and plotly figures.

No Streamlit here, so these are easy to test and reuse from a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# ----------------------------------------------------------------------------------- images
ICON_RGB = (31, 119, 180)  # the first colour of the runs' palette


def icon(size: int = 32, cells: int = 8) -> np.ndarray:
    """The page icon, a disc of dots shrinking outwards (RGBA), drawn here so that the browser loads
    nothing from outside the server: a ``:material/…`` page icon is fetched from Google's font CDN."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cell = size / cells
    cy, cx = (np.floor(yy / cell) + 0.5) * cell, (np.floor(xx / cell) + 0.5) * cell
    radius = 0.55 * cell * np.clip(1 - np.hypot(cx - size / 2, cy - size / 2) / (size / 2), 0, 1)
    out = np.zeros((size, size, 4), dtype=np.uint8)
    out[np.hypot(xx - cx, yy - cy) <= radius] = (*ICON_RGB, 255)
    return out


def image_of(vec: Sequence[float] | np.ndarray, height: int, width: int, lo: float = 0.0, hi: float = 1.0,
             target: int = 96) -> np.ndarray | None:
    """A flat pixel vector as a uint8 image (H, W) or (H, W, 3), upscaled (nearest) to ~``target`` px."""
    x = np.asarray(vec, dtype=np.float64).ravel()
    if height <= 0 or width <= 0 or x.size == 0 or x.size % (height * width):
        return None
    c = x.size // (height * width)
    if c not in (1, 3):
        return None
    img = x.reshape(c, height, width)
    img = img[0] if c == 1 else img.transpose(1, 2, 0)
    scale = (hi - lo) if hi > lo else 1.0
    img = np.nan_to_num((img - lo) / scale, nan=0.0).clip(0.0, 1.0)
    k = max(1, target // max(height, width))
    img = np.kron(img, np.ones((k, k))) if c == 1 else img.repeat(k, 0).repeat(k, 1)
    return (img * 255).round().astype(np.uint8)


def pixel_range(rows: Sequence[np.ndarray]) -> tuple[float, float]:
    """The display range of the originals: [0, 1] for images in [0, 1], else their min/max."""
    lo = min(float(np.min(r)) for r in rows)
    hi = max(float(np.max(r)) for r in rows)
    if lo >= -1e-6 and hi <= 1 + 1e-6:
        return 0.0, 1.0
    return lo, hi


# -------------------------------------------------------------------------------------- latents
def latent_columns(df: pd.DataFrame, prefix: str = "z") -> list[str]:
    cols = [c for c in df.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def pca_2d(z: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The first two principal components of ``z`` (N, d) and their explained-variance ratios."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        return np.zeros((0, 2)), [0.0, 0.0]
    if z.shape[1] == 1:
        return np.concatenate([z, np.zeros_like(z)], 1), [1.0, 0.0]
    if z.shape[1] == 2:
        return z, [float("nan"), float("nan")]
    zc = z - z.mean(0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    var = s**2
    ratio = (var / var.sum()).tolist() if var.sum() > 0 else [0.0] * len(var)
    return zc @ vt[:2].T, ratio[:2]


# ------------------------------------------------------------------------------------- pareto
def pareto_mask(x: Sequence[float], y: Sequence[float]) -> np.ndarray:
    """True where no other point is at least as good in both (both minimised) and better in one."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        mask[i] = not dominated.any()
    return mask


def rd_figure(df: pd.DataFrame, rate: str, dist: str, highlight: Sequence[str] = ()) -> go.Figure:
    """Rate vs distortion, one colour per method, β beside each point, the Pareto front drawn."""
    df = df.copy()
    df["_front"] = pareto_mask(df[rate], df[dist])
    fig = go.Figure()
    methods = sorted(df["method"].fillna("unknown").astype(str).unique())
    colours = {"diffusion": "#1f77b4", "vae": "#d62728"}
    for i, m in enumerate(methods):
        sub = df[df["method"].fillna("unknown").astype(str) == m]
        text = [f"β={b:g}" if isinstance(b, int | float) and math.isfinite(b) else "" for b in sub["beta"]]
        size = [16 if r in highlight else 11 for r in sub["id"]]
        fig.add_trace(go.Scatter(
            x=sub[rate], y=sub[dist], mode="markers+text", name=m, text=text, textposition="top center",
            marker={"size": size, "color": colours.get(m, PALETTE_FALLBACK[i % len(PALETTE_FALLBACK)]),
                    "line": {"width": [2 if f else 0 for f in sub["_front"]], "color": "black"}},
            customdata=np.stack([sub["id"].astype(str)], axis=-1),
            hovertemplate="%{customdata[0]}<br>" + f"{rate}=%{{x:.4g}}<br>{dist}=%{{y:.4g}}<extra>{m}</extra>",
        ))
    front = df[df["_front"]].sort_values(rate)
    if len(front):
        fig.add_trace(go.Scatter(
            x=front[rate], y=front[dist], mode="lines", name="Pareto front", line={"shape": "hv", "dash": "dash",
                                                                                  "color": "black", "width": 1.5},
            hoverinfo="skip",
        ))
    fig.update_layout(xaxis_title=rate, yaxis_title=dist, height=480, legend_title="method",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


PALETTE_FALLBACK = ["#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


# ------------------------------------------------------------------------------------- curves
def curves_figure(histories: Mapping[str, pd.DataFrame], metric: str, xcol: str, colours: Mapping[str, str],
                  log_y: bool = False) -> go.Figure | None:
    """One metric over training, one line per run (NaN rows of that metric dropped)."""
    fig = go.Figure()
    for rid, h in histories.items():
        if metric not in h or xcol not in h:
            continue
        sub = h[[xcol, metric]].apply(pd.to_numeric, errors="coerce").dropna()
        if sub.empty:
            continue
        fig.add_trace(go.Scatter(x=sub[xcol], y=sub[metric], mode="lines+markers" if len(sub) < 60 else "lines",
                                 name=rid, line={"color": colours.get(rid)}, marker={"size": 5}))
    if not fig.data:
        return None
    fig.update_layout(title=metric, xaxis_title=xcol, height=300, showlegend=True,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def per_dim_figure(stats: Mapping[str, Mapping[str, Sequence[float]]], key: str, colours: Mapping[str, str],
                   title: str, hline: float | None = None) -> go.Figure | None:
    fig = go.Figure()
    for rid, s in stats.items():
        vals = s.get(key)
        if vals is None or len(vals) == 0:
            continue
        fig.add_trace(go.Bar(x=[f"z{i}" for i in range(len(vals))], y=list(vals), name=rid,
                             marker_color=colours.get(rid)))
    if not fig.data:
        return None
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, barmode="group", height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def histogram_figure(samples: Mapping[str, np.ndarray], colours: Mapping[str, str], title: str) -> go.Figure | None:
    fig = go.Figure()
    lo, hi = -4.0, 4.0
    for rid, v in samples.items():
        v = np.asarray(v, dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        fig.add_trace(go.Histogram(x=v, name=rid, histnorm="probability density", opacity=0.55, nbinsx=40,
                                   marker_color=colours.get(rid)))
    if not fig.data:
        return None
    grid = np.linspace(lo, hi, 200)
    fig.add_trace(go.Scatter(x=grid, y=np.exp(-grid**2 / 2) / math.sqrt(2 * math.pi), mode="lines",
                             name="prior N(0, 1)", line={"color": "black", "dash": "dash"}))
    fig.update_layout(title=title, barmode="overlay", height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def scatter_2d(xy: np.ndarray, colour: pd.Series | None, title: str, axes: tuple[str, str]) -> go.Figure:
    fig = go.Figure()
    if colour is None or colour.isna().all():
        fig.add_trace(go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", marker={"size": 5}, name="test x"))
    elif pd.api.types.is_numeric_dtype(colour) and colour.nunique() > 12:
        fig.add_trace(go.Scattergl(x=xy[:, 0], y=xy[:, 1], mode="markers", name=str(colour.name),
                                   marker={"size": 5, "color": colour.to_numpy(dtype=float), "colorscale": "Viridis",
                                           "showscale": True, "colorbar": {"title": str(colour.name)}}))
    else:
        for v in sorted(colour.dropna().unique(), key=lambda t: (str(type(t)), t)):
            m = (colour == v).to_numpy()
            fig.add_trace(go.Scattergl(x=xy[m, 0], y=xy[m, 1], mode="markers", marker={"size": 6}, name=str(v)))
    fig.update_layout(title=title, xaxis_title=axes[0], yaxis_title=axes[1], height=380,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def posterior_figure(df: pd.DataFrame, title: str) -> go.Figure:
    """Encoder samples against exact posterior samples for one test x (2-D)."""
    fig = go.Figure()
    style = {"exact": ("#7f7f7f", 0.35), "encoder": ("#1f77b4", 0.55)}
    for source in ("exact", "encoder"):
        sub = df[df["source"] == source]
        if sub.empty:
            continue
        c, a = style[source]
        fig.add_trace(go.Scattergl(x=sub["z0"], y=sub["z1"], mode="markers", name=source,
                                   marker={"size": 4, "color": c, "opacity": a}))
    fig.update_layout(title=title, xaxis_title="z0", yaxis_title="z1", height=340,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2})
    return fig


def error_figure(errors: pd.DataFrame, colours: Mapping[str, str]) -> go.Figure:
    """Per-image error, grouped by test image, one bar per run and reconstruction kind."""
    fig = go.Figure()
    for (rid, kind), sub in errors.groupby(["run", "kind"], sort=False):
        fig.add_trace(go.Bar(x=sub["index"].astype(str), y=sub["mse"], name=f"{rid} · {kind}",
                             marker_color=colours.get(rid), marker_pattern_shape="" if kind == "refined" else "/",
                             opacity=1.0 if kind == "refined" else 0.6))
    fig.update_layout(title="per-image MSE", barmode="group", xaxis_title="test image", yaxis_title="MSE",
                      height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend={"orientation": "h", "y": -0.3})
    return fig
