"""Reconstructions: the same test images for every compared run, side by side, with per-image error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import common, figures
from diffenc_core import runs

table, chosen = common.page_runs("Reconstructions")
col = common.colours(chosen)

recons: dict[str, pd.DataFrame] = {}
IMG_PX = 96
NEEDED = {"index", "x", "recon_amortised", "recon_refined", "height", "width"}
for rid in chosen:
    df, problems = common.read_table(rid, runs.RECON)
    if df is None:
        common.explain_missing(rid, problems or [f"{runs.RECON}{common.MISSING}"], "no reconstructions", table)
        continue
    missing = NEEDED - set(df.columns)
    if missing or df.empty:
        common.warn_problems(rid, [f"recon.parquet lacks {sorted(missing) or 'rows'}"])
        continue
    recons[rid] = df.sort_values("index").reset_index(drop=True)
if not recons:
    st.stop()


# -- runs evaluated on the same test examples are shown together
def _fingerprint(df: pd.DataFrame) -> str:
    x = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in df["x"]])
    return common.digest(int(df["height"].iloc[0]), int(df["width"].iloc[0]), np.round(x, 4).tobytes())


groups: dict[str, list[str]] = {}
for rid, df in recons.items():
    with common.guard(f"{rid}: recon.parquet"):
        groups.setdefault(_fingerprint(df), []).append(rid)
if len(groups) > 1:
    st.info("The compared runs were evaluated on different test examples (different datasets or splits); "
            "each group below shares its test images.")

n_max = max(len(df) for df in recons.values())
n_show = st.slider("Test images", 1, max(1, n_max), min(6, n_max)) if n_max > 1 else 1

summary = []
for rid in recons:
    m, _ = common.read_metrics(rid)
    summary.append({"run": rid, "method": m.get("method"), "mse_amortised": m.get("mse_amortised"),
                    "mse_refined": m.get("mse_refined"), "psnr_amortised_db": m.get("psnr_amortised_db"),
                    "psnr_refined_db": m.get("psnr_refined_db"), "refine_steps": m.get("refine_steps")})
st.caption("Test-set means from metrics.json (amortised = the encoder's sample decoded; refined = after "
           "Langevin refinement of that sample).")
st.dataframe(common.frame(summary), hide_index=True)

for g, members in enumerate(groups.values()):
    base = recons[members[0]]
    h, w = int(base["height"].iloc[0]), int(base["width"].iloc[0])
    dataset = table.set_index("id")["dataset"].get(members[0]) if "dataset" in table else None
    st.subheader(f"{dataset or 'test set'} — {', '.join(members)}" if len(groups) > 1 else "Side by side")
    k = min(n_show, len(base))
    errors = []
    for rid in members:
        df = recons[rid]
        for _, r in df.head(k).iterrows():
            for kind in ("amortised", "refined"):
                errors.append({"run": rid, "kind": kind, "index": int(r["index"]), "mse": float(r[f"mse_{kind}"])
                               if f"mse_{kind}" in df else float("nan")})
    if h > 0 and w > 0:
        with common.guard("image grid"):
            lo, hi = figures.pixel_range([np.asarray(v) for v in base["x"].head(k)])
            head = st.columns([1] + [2] * len(members))
            head[0].markdown("**original**")
            for c, rid in zip(head[1:], members, strict=True):
                c.markdown(f"<span style='color:{col[rid]}'>■</span> **{rid}**", unsafe_allow_html=True)
            sub = st.columns([1] + [1, 1] * len(members))
            for j in range(len(members)):
                sub[1 + 2 * j].caption("amortised")
                sub[2 + 2 * j].caption("refined (Langevin)")
            for i in range(k):
                r0 = base.iloc[i]
                cells = st.columns([1] + [1, 1] * len(members))
                label = r0.get("label")
                tag = f"#{int(r0['index'])}" + (f" · label {label}" if pd.notna(label) else "")
                img = figures.image_of(r0["x"], h, w, lo, hi, target=IMG_PX)
                if img is not None:
                    cells[0].image(img, caption=tag, width=IMG_PX)
                for j, rid in enumerate(members):
                    rr = recons[rid].iloc[i] if i < len(recons[rid]) else None
                    if rr is None:
                        continue
                    for off, kind in enumerate(("amortised", "refined")):
                        im = figures.image_of(rr[f"recon_{kind}"], h, w, lo, hi, target=IMG_PX)
                        err = pd.to_numeric(rr.get(f"mse_{kind}"), errors="coerce")
                        if im is not None:
                            cells[1 + 2 * j + off].image(im, caption=f"mse {err:.4f}", width=IMG_PX)
    else:
        with common.guard("reconstruction table"):
            st.caption("Vector data (no image shape): originals and reconstructions as numbers.")
            rows = []
            for rid in members:
                for _, r in recons[rid].head(k).iterrows():
                    rows.append({"run": rid, "index": int(r["index"]),
                                 "x": np.round(np.asarray(r["x"], dtype=float), 3).tolist(),
                                 "amortised": np.round(np.asarray(r["recon_amortised"], dtype=float), 3).tolist(),
                                 "refined": np.round(np.asarray(r["recon_refined"], dtype=float), 3).tolist(),
                                 "mse_amortised": r.get("mse_amortised"), "mse_refined": r.get("mse_refined")})
            st.dataframe(pd.DataFrame(rows).astype({"x": str, "amortised": str, "refined": str}), hide_index=True)
    with common.guard("per-image error"):
        st.plotly_chart(figures.error_figure(pd.DataFrame(errors), col), key=f"err_{g}")
