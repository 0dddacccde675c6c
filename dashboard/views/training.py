"""Training: curves overlaid across runs; live refresh while a compared run is still running."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import common, figures
from diffenc_core import runs

table, chosen = common.page_runs("Training")

PREFERRED = ["loss_encoder", "loss_vae", "recon_nll", "sync_gap", "accept", "val_neg_elbo", "val_rate",
             "val_distortion", "val_mse", "rate", "step_size", "sigma_x"]
AXES = ["step", "time_s", "epoch"]


def _histories(warn: bool = True) -> tuple[dict, dict[str, str]]:
    out, states = {}, {}
    for rid in chosen:
        states[rid] = common.read_status(rid).get("state", "unknown")
        h, problems = common.read_table(rid, runs.HISTORY)
        if (h is None or h.empty) and warn:
            common.explain_missing(rid, problems or [f"{runs.HISTORY}{common.EMPTY}"], "no history", table)
        if h is not None and not h.empty:
            out[rid] = h
    return out, states


hist, states = _histories()
available = sorted({c for h in hist.values() for c in h.columns if c not in AXES})
ordered = [c for c in PREFERRED if c in available] + [c for c in available if c not in PREFERRED]
c1, c2, c3 = st.columns([3, 1, 1])
chosen_metrics = c1.multiselect("Curves", ordered, default=[c for c in PREFERRED[:8] if c in available])
xcol = c2.radio("x axis", AXES, horizontal=True)
log_y = c3.toggle("log y", value=False)

running = [r for r, s in states.items() if s == "running"]
live, every = False, 5
if running:
    c1, c2 = st.columns([1, 3])
    live = c1.toggle("Live refresh", value=True, help="re-read the history of running runs periodically")
    every = c2.select_slider("every (s)", [2, 5, 10, 30, 60], value=5, disabled=not live)


def _curves() -> None:
    h, s = _histories(warn=False) if live else (hist, states)
    still = [r for r, v in s.items() if v == "running"]
    if still:
        last = {r: pd.to_numeric(h[r]["step"], errors="coerce").max() for r in still if r in h and "step" in h[r]}
        st.caption("Running: " + ", ".join(f"`{r}` (step {last.get(r, float('nan')):.0f})" for r in still)
                   + (f" · refreshing every {every} s" if live else ""))
    elif running:
        st.caption("All compared runs have finished.")
    col = common.colours(list(h))
    cols = st.columns(2)
    for i, m in enumerate(chosen_metrics):
        with cols[i % 2], common.guard(m):
            fig = figures.curves_figure(h, m, xcol, col, log_y=log_y)
            if fig is None:
                st.caption(f"{m}: no values for the compared runs")
            else:
                st.plotly_chart(fig, key=f"curve_{m}")


if not hist:
    st.stop()
st.fragment(_curves, run_every=every if (running and live) else None)()
