"""Rate–distortion: every evaluated run as a point, coloured by method, β labelled, Pareto front drawn."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import common, figures

st.title("Rate–distortion")
table = common.runs_table()
RATES = ["rate_nats", "rate_exact_logq_nats", "rate_score_integral_nats"]
DISTS = ["distortion_nats", "mse_refined", "mse_amortised"]
rate_opts = [c for c in RATES if c in table and table[c].notna().any()]
dist_opts = [c for c in DISTS if c in table and table[c].notna().any()]
if table.empty or not rate_opts or not dist_opts:
    st.info("No evaluated runs with a rate and a distortion yet (metrics.json from `diffenc evaluate`).")
    st.stop()

compare = [r for r in st.session_state.get(common.K_COMPARE) or [] if r in set(table["id"])]
c1, c2, c3, c4 = st.columns(4)
rate = c1.selectbox("Rate", rate_opts)
dist = c2.selectbox("Distortion", dist_opts)
datasets = sorted(str(d) for d in table["dataset"].dropna().unique()) if "dataset" in table else []
# default: the dataset of the compared runs, else the one with the most evaluated runs
evaluated = table.dropna(subset=[rate_opts[0], dist_opts[0]])
ranked = [str(d) for d in table[table["id"].isin(compare)]["dataset"].dropna()]
ranked += [str(d) for d in evaluated["dataset"].dropna().value_counts().index] if "dataset" in evaluated else []
first = next((d for d in ranked if d in datasets), None)
dataset = (c3.selectbox("Dataset", datasets, index=datasets.index(first) if first else 0) if len(datasets) > 1
           else (datasets[0] if datasets else None))
only = c4.toggle("Only compared runs", value=False, disabled=not compare)

pts = table.copy()
pts[rate] = pd.to_numeric(pts[rate], errors="coerce")
pts[dist] = pd.to_numeric(pts[dist], errors="coerce")
skipped = pts[pts[rate].isna() | pts[dist].isna()]
pts = pts.dropna(subset=[rate, dist])
if dataset is not None and len(datasets) > 1:
    pts = pts[pts["dataset"].astype(str) == dataset]
if only and compare:
    pts = pts[pts["id"].isin(compare)]
if pts.empty:
    st.info("No runs with both values for this choice.")
    st.stop()
if len(skipped):
    st.caption(f"{len(skipped)} run(s) without both values are left out: "
               + ", ".join(f"`{r}`" for r in skipped["id"][:10]) + (" …" if len(skipped) > 10 else ""))
if "beta" not in pts:
    pts["beta"] = float("nan")
if "method" not in pts:
    pts["method"] = "unknown"
pts["beta"] = pd.to_numeric(pts["beta"], errors="coerce")

with common.guard("rate–distortion plot"):
    st.caption("Lower-left is better. Points with a black outline lie on the Pareto front (no other run has "
               "both lower rate and lower distortion); larger points are the runs being compared."
               + (" Different datasets are not comparable: pick one above." if len(datasets) > 1 else ""))
    st.plotly_chart(figures.rd_figure(pts, rate, dist, highlight=compare), key="rd")
    front = pts[figures.pareto_mask(pts[rate], pts[dist])].sort_values(rate)
    extra = [c for c in ("elbo_nats", "mse_refined") if c in pts and c not in (rate, dist)]
    st.markdown(f"**Pareto front** ({len(front)} of {len(pts)} runs)")
    st.dataframe(front[["id", "method", "beta", rate, dist, *extra]], hide_index=True)
