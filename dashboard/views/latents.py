"""Latents: per-dimension statistics, active units, histograms, a 2-D view, aggregate KL, toy posteriors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import common, figures
from diffenc_core import runs

table, chosen = common.page_runs("Latents")
col = common.colours(chosen)

latents: dict[str, pd.DataFrame] = {}
metrics: dict[str, dict] = {}
for rid in chosen:
    metrics[rid], mprob = common.read_metrics(rid)
    df, problems = common.read_table(rid, runs.LATENTS)
    if df is None or not figures.latent_columns(df):
        if df is not None:
            problems = [*problems, f"{runs.LATENTS}: no latent columns (z0, z1, …)"]
        common.explain_missing(rid, (problems or [f"{runs.LATENTS}{common.MISSING}"]) + mprob, "no latents", table)
        continue
    latents[rid] = df
    if mprob:
        common.warn_problems(rid, mprob)

# -- summary: active units and distance of the aggregate posterior from the prior
rows = []
for rid in chosen:
    m = metrics.get(rid, {})
    rows.append({"run": rid, "method": m.get("method"), "latent_dim": m.get("latent_dim"),
                 "active_units": m.get("active_units"),
                 "aggregate_kl_to_prior_nats": m.get("aggregate_kl_to_prior_nats"),
                 "rate_nats": m.get("rate_nats"), "probe_accuracy": m.get("probe_accuracy"),
                 "mode_mass_error": m.get("mode_mass_error")})
summary = common.frame(rows)
st.caption("Active units: dimensions whose posterior mean varies across test x (Var_x E[z|x] above the "
           "threshold). Aggregate KL: KL(moment-matched aggregate posterior ‖ N(0, I)).")
st.dataframe(summary, hide_index=True)
if not latents:
    st.stop()


# -- per-dimension statistics (from metrics.json, else computed from latents.parquet)
def _stats(rid: str) -> dict[str, list[float]]:
    m, df = metrics.get(rid, {}), latents[rid]
    zc = figures.latent_columns(df, "z")
    mc = figures.latent_columns(df, "mean_z")
    out = {}
    for key, cols, fn in (("latent_mean", zc, np.mean), ("latent_var", zc, np.var),
                          ("latent_var_of_mean", mc or zc, np.var)):
        v = m.get(key)
        ok = isinstance(v, list) and all(isinstance(t, int | float) for t in v)
        out[key] = v if ok else [float(fn(pd.to_numeric(df[c], errors="coerce").dropna())) for c in cols]
    return out


stats = {}
for rid in latents:
    with common.guard(f"{rid}: latent statistics"):
        stats[rid] = _stats(rid)
thr = None
for rid in latents:
    t = common.read_params(rid).get("eval", {})
    if isinstance(t, dict) and isinstance(t.get("active_unit_threshold"), int | float):
        thr = float(t["active_unit_threshold"])
        break

st.subheader("Per-dimension statistics")
c1, c2, c3 = st.columns(3)
for c, key, title, hl in ((c1, "latent_mean", "mean of z", 0.0), (c2, "latent_var", "variance of z", 1.0),
                          (c3, "latent_var_of_mean", "Var_x E[z|x] (activity)", thr)):
    with c, common.guard(title):
        fig = figures.per_dim_figure(stats, key, col, title, hline=hl)
        if fig is not None:
            st.plotly_chart(fig, key=f"dim_{key}")

# -- histograms
st.subheader("Histograms")
dmax = max(len(figures.latent_columns(df)) for df in latents.values())
dim = st.selectbox("Dimension", list(range(dmax)), format_func=lambda i: f"z{i}")
with common.guard("histogram"):
    samples = {rid: pd.to_numeric(df[f"z{dim}"], errors="coerce").to_numpy()
               for rid, df in latents.items() if f"z{dim}" in df}
    fig = figures.histogram_figure(samples, col, f"z{dim}: encoder samples on the test set vs the prior")
    if fig is not None:
        st.plotly_chart(fig, key="hist")

# -- 2-D view coloured by label or generating factor
st.subheader("2-D view")
colour_opts = sorted({c for df in latents.values() for c in df.columns if c == "label" or c.startswith("factor_")})
c1, c2 = st.columns(2)
colour_by = c1.selectbox("Colour by", ["(none)", *colour_opts], index=1 if colour_opts else 0)
which = c2.radio("Points", ["posterior mean", "one encoder sample"], horizontal=True)
cols = st.columns(min(len(latents), 3))
for i, (rid, df) in enumerate(latents.items()):
    with cols[i % len(cols)], common.guard(f"{rid}: 2-D view"):
        zc = figures.latent_columns(df, "mean_z") if which == "posterior mean" else []
        zc = zc or figures.latent_columns(df, "z")
        z = df[zc].apply(pd.to_numeric, errors="coerce").dropna()
        xy, ratio = figures.pca_2d(z.to_numpy())
        if len(zc) > 2:
            axes, how = (f"PC1 ({ratio[0]:.0%})", f"PC2 ({ratio[1]:.0%})"), "PCA"
        else:
            axes, how = (zc[0], zc[1] if len(zc) > 1 else "0"), "latents"
        colour = df.loc[z.index, colour_by] if colour_by in df else None
        st.plotly_chart(figures.scatter_2d(xy, colour, f"{rid} ({how}, d={len(zc)})", axes), key=f"sc_{i}")

# -- toys with a known posterior: encoder samples vs exact samples
posts = {}
for rid in latents:
    p, problems = common.read_table(rid, runs.POSTERIOR)
    if p is not None and len(p) and {"x_index", "source", "z0", "z1"} <= set(p.columns):
        posts[rid] = p
    elif p is None and problems and problems != [f"{runs.POSTERIOR}: missing"]:
        common.warn_problems(rid, problems)
if posts:
    st.subheader("Posterior samples: encoder vs exact")
    st.caption("For toy data with a known decoder: samples from the diffusion encoder q(z|x) against exact "
               "samples from the (β-tempered) posterior p(z|x), for a few test x.")
    for rid, p in posts.items():
        mm = metrics.get(rid, {}).get("mode_mass_error")
        st.markdown(f"**{rid}**" + (f" · mode-mass error {mm:.3f}" if isinstance(mm, int | float) else ""))
        xs = sorted(p["x_index"].unique())[:4]
        pcols = st.columns(len(xs))
        for c, xi in zip(pcols, xs, strict=True):
            with c, common.guard(f"{rid}: posterior x#{xi}"):
                st.plotly_chart(figures.posterior_figure(p[p["x_index"] == xi], f"test x #{xi}"),
                                key=f"post_{rid}_{xi}")
