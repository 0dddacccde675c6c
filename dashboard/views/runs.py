"""Runs: every run under the runs folder, filterable and sortable; pick the runs to compare."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from dashboard import common, index

st.title("Runs")
root = common.runs_root()
table = common.runs_table()
if table.empty:
    st.info(f"No run directories under `{root}` yet. Train one with `diffenc train`, or point the sidebar "
            "at another runs folder.")
    st.stop()

# -- runs that need attention: listed (the first few in full), never fatal
MAX_WARNINGS = 8  # more than this many broken runs: name them in one line, the table has the rest
NAMES_SHOWN = 12  # run ids spelled out in a one-line list


def _names(ids: list[str]) -> str:
    return ", ".join(f"`{r}`" for r in ids[:NAMES_SHOWN]) + (f" … (+{len(ids) - NAMES_SHOWN})"
                                                             if len(ids) > NAMES_SHOWN else "")


bad = table[table["problems"].notna()]
for _, r in bad.head(MAX_WARNINGS).iterrows():
    st.warning(f"**{r['id']}** ({r.get('state') or 'unknown'}): {r['problems']}", icon=":material/warning:")
if len(bad) > MAX_WARNINGS:
    st.warning(f"{len(bad) - MAX_WARNINGS} more run(s) need attention: {_names(list(bad['id'][MAX_WARNINGS:]))} "
               "— filter the table by health *attention* to see their problems.", icon=":material/warning:")
running = table[table["state"] == "running"]
if len(running):
    st.info(f"{len(running)} run(s) in progress: " + _names(list(running["id"])))
for health, what in ((index.NOT_EVALUATED, "trained but not evaluated yet (`diffenc evaluate --run <run dir>`)"),
                     (index.INTERRUPTED, "interrupted (`diffenc train --resume` continues them)")):
    ids = list(table.loc[table["health"] == health, "id"])
    if ids:
        st.info(f"{len(ids)} run(s) {what}: {_names(ids)}", icon=":material/hourglass_empty:")

# -- filters
c1, c2, c3, c4, c5 = st.columns([2, 1, 1, 1, 1])
text = c1.text_input("Filter by name", placeholder="substring of the run id, e.g. tune/ or vae")


def _options(col: str) -> list[str]:
    return sorted(str(v) for v in table[col].dropna().unique()) if col in table else []


methods = c2.multiselect("Method", _options("method"))
datasets = c3.multiselect("Dataset", _options("dataset"))
states = c4.multiselect("State", _options("state"))
healths = c5.multiselect("Health", _options("health"))
view = table
if text:
    view = view[view["id"].str.contains(text, case=False, regex=False)]
for col, chosen in (("method", methods), ("dataset", datasets), ("state", states), ("health", healths)):
    if chosen:
        view = view[view[col].astype(str).isin(chosen)]
view = view.reset_index(drop=True)

metric_cols = [c for c in table.columns if c not in common.BASE_COLUMNS and c not in common.KEY_PARAMS
               and c not in ("run", "name", "problems", "note", "started", "finished", "error")]
with st.expander("Columns"):
    shown_metrics = st.multiselect(
        "Final metrics", metric_cols, default=[c for c in common.DEFAULT_METRICS if c in metric_cols],
    )
    shown_params = st.multiselect("Key parameters", [c for c in common.KEY_PARAMS if c in table],
                                  default=[c for c in ("steps", "e_step", "langevin_steps") if c in table])
notes = ["note"] if "note" in view and view["note"].notna().any() else []
columns = [c for c in common.BASE_COLUMNS if c in view] + shown_params + shown_metrics + ["problems", *notes]

# -- the table; its row selection is the comparison shared by every page
visible = list(view["id"])
compare = list(st.session_state.get(common.K_COMPARE) or [])
key = "runs_table_" + common.digest(visible, compare)


def _on_select() -> None:
    state = st.session_state.get(key)
    rows = list(state["selection"]["rows"]) if state is not None else []
    chosen = [visible[i] for i in rows if 0 <= i < len(visible)]
    kept = [r for r in st.session_state.get(common.K_COMPARE) or [] if r not in visible or r in chosen]
    st.session_state[common.K_COMPARE] = kept + [r for r in chosen if r not in kept]


st.caption(f"{len(view)} of {len(table)} run(s) · click a column header to sort · tick rows to compare them "
           "on the other pages")
st.dataframe(
    view[columns], key=key, on_select=_on_select, selection_mode="multi-row", hide_index=True,
    selection_default={"selection": {"rows": [i for i, r in enumerate(visible) if r in compare]}},
    column_config={
        "id": st.column_config.TextColumn("run", pinned=True),
        "health": st.column_config.TextColumn(
            "health", width="small",
            help="ok · running · not evaluated · interrupted · attention (a broken file or a failure: see problems)"),
        "problems": st.column_config.TextColumn("problems", width="large"),
        "ais_log_px_nats": st.column_config.NumberColumn(
            help="log p(x) by AIS, mean over the first n_ais test x (eval.ais_n); the ais_gap_* use the same x, "
                 "the bounds all of them"),
    },
)

if compare:
    st.markdown("**Comparing:** " + " · ".join(f"`{r}`" for r in compare))
    c1, c2, c3, c4, c5 = st.columns(5)
    c1.page_link("views/reconstructions.py", label="Reconstructions", icon=":material/image:")
    c2.page_link("views/latents.py", label="Latents", icon=":material/scatter_plot:")
    c3.page_link("views/training.py", label="Training", icon=":material/show_chart:")
    c4.page_link("views/rate_distortion.py", label="Rate–distortion", icon=":material/balance:")
    c5.page_link("views/tuning.py", label="Tuning", icon=":material/tune:")

# -- one run in detail
st.subheader("Run details")
labels = common.run_labels(table)
ids = list(table["id"])
pick = st.selectbox("Run", ids, index=ids.index(compare[0]) if compare and compare[0] in labels else 0,
                    format_func=lambda r: labels.get(r, r))
if pick:
    with common.guard(f"{pick}: details"):
        row = table[table["id"] == pick].iloc[0]
        if isinstance(row.get("problems"), str):
            st.warning(row["problems"], icon=":material/warning:")
        elif isinstance(row.get("note"), str):
            st.info(row["note"], icon=":material/hourglass_empty:")
        metrics, problems = common.read_metrics(pick)
        t1, t2, t3, t4 = st.tabs(["Metrics", "Parameters", "Status", "Plots"])
        with t1:
            flat = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
            if flat:
                st.dataframe(pd.DataFrame({"metric": list(flat), "value": [str(v) for v in flat.values()]}),
                             hide_index=True)
            else:
                st.caption("no metrics.json (not evaluated yet, or unreadable)")
        with t2:
            st.json(common.read_params(pick) or {}, expanded=1)
        with t3:
            st.code(json.dumps(common.read_status(pick), indent=2, default=str), language="json")
        with t4:
            pngs = common.plot_files(pick)
            if not pngs:
                st.caption("no plots yet")
            for png in pngs:
                with common.guard(f"{pick}: {png.name}"):
                    st.image(str(png), caption=png.name)
