"""Tuning: an Optuna study's history, parameter importances and parallel coordinates; trials → runs."""

from __future__ import annotations

import os
from typing import Any

import streamlit as st

from dashboard import common, optuna_io

st.title("Tuning")
root = common.runs_root()
table = common.runs_table()


@st.cache_data(ttl=10, show_spinner=False)
def _discover(runs_dir: str, candidates: tuple[str, ...]) -> list[str]:
    return optuna_io.discover(runs_dir, candidates=candidates)


@st.cache_resource(max_entries=8, show_spinner=False)
def _storage(spec: str) -> Any:
    return optuna_io.open_storage(spec)


specs: list[str] = []
env = os.environ.get(common.STORAGE_ENV)
if env:
    specs.append(optuna_io.normalise(env))
specs += [s for s in _discover(str(root), common.run_index(str(root)).storages()) if s not in specs]
c1, c2 = st.columns([2, 2])
other = c2.text_input("…or another storage", placeholder="sqlite:///path/study.db, postgresql://…, or a journal file",
                      help="a storage URL, an SQLite file or a JournalFileBackend log file")
if other:
    spec = optuna_io.normalise(other)
elif specs:
    spec = c1.selectbox("Storage", specs, format_func=optuna_io.shown)
else:
    st.info(f"No Optuna storage found under `{root}`. Run `diffenc tune`, start the dashboard with "
            "`--storage`, or enter a storage above.")
    st.stop()

try:
    storage = _storage(spec)
    studies = optuna_io.study_summaries(storage)
except Exception as err:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""  # SQLAlchemy appends a help link
    st.warning(f"Cannot open `{optuna_io.shown(spec)}`: {err.__class__.__name__}: {first}", icon=":material/warning:")
    st.stop()
if studies.empty:
    st.info(f"`{optuna_io.shown(spec)}` holds no studies yet.")
    st.stop()

name = st.selectbox("Study", list(studies["study"]),
                    format_func=lambda s: f"{s} ({int(studies.set_index('study').loc[s, 'trials'])} trials)")

import optuna  # noqa: E402  (only this page needs it)
from optuna import visualization as vis  # noqa: E402

study = optuna.load_study(study_name=name, storage=storage)
trials = study.get_trials(deepcopy=False)
complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
counts = {}
for t in trials:
    counts[t.state.name] = counts.get(t.state.name, 0) + 1
multi = len(study.directions) > 1
c = st.columns(4)
c[0].metric("trials", len(trials))
c[1].metric("complete", counts.get("COMPLETE", 0))
c[2].metric("pruned", counts.get("PRUNED", 0))
c[3].metric("failed / running", f"{counts.get('FAIL', 0)} / {counts.get('RUNNING', 0)}")
if not multi and complete:
    best = study.best_trial
    st.markdown(f"**Best:** trial {best.number} · value {best.value:.5g} · "
                + ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`" for k, v in best.params.items()))


@st.cache_data(max_entries=64, show_spinner="drawing…")
def _figure(spec: str, study_name: str, kind: str, stamp: tuple) -> Any:
    s = optuna.load_study(study_name=study_name, storage=_storage(spec))
    target = (lambda t: t.values[0]) if len(s.directions) > 1 else None
    tname = s.metric_names[0] if s.metric_names else "objective"
    if kind == "history":
        return vis.plot_optimization_history(s, target=target, target_name=tname)
    if kind == "importance":
        return vis.plot_param_importances(s, target=target, target_name=tname)
    if kind == "parallel":
        return vis.plot_parallel_coordinate(s, target=target, target_name=tname)
    if kind == "intermediate":
        return vis.plot_intermediate_values(s)
    if kind == "pareto":
        return vis.plot_pareto_front(s)
    raise ValueError(kind)


stamp = (len(trials), len(complete), sum(len(t.intermediate_values) for t in trials))
tabs = ["Optimisation history", "Parameter importances", "Parallel coordinates", "Intermediate values"]
if multi:
    tabs.append("Pareto front")
kinds = ["history", "importance", "parallel", "intermediate", "pareto"]
for tab, kind in zip(st.tabs(tabs), kinds, strict=False):
    with tab:
        if kind in ("importance", "parallel") and len(complete) < 2:
            st.info("Needs at least two complete trials.")
            continue
        try:
            fig = _figure(spec, name, kind, stamp)
        except Exception as err:  # e.g. importances with a single distinct parameter value
            st.info(f"Not available for this study: {err.__class__.__name__}: {err}")
            continue
        fig.update_layout(height=440)
        st.plotly_chart(fig, key=f"tune_{kind}")

# -- trials, each linked to its run directory
st.subheader("Trials")
known = set(table["id"])
df = optuna_io.trials_frame(trials, root, known)
if df.empty:
    st.stop()
state_of = table.set_index("id")["state"].to_dict() if "state" in table else {}
df["run state"] = df["run"].map(lambda r: state_of.get(r) if isinstance(r, str) else None)
linked = df["run"].notna().sum()
st.caption(f"{linked} of {len(df)} trial(s) linked to a run directory under `{root}`. Tick trials and press the "
           "button to compare their runs on the other pages.")
key = "trials_" + common.digest(spec, name, stamp)
sel = st.dataframe(df, key=key, on_select="rerun", selection_mode="multi-row", hide_index=True,
                   column_config={"run": st.column_config.TextColumn("run", pinned=True)})
picked = [df.iloc[i]["run"] for i in (sel.selection.rows if sel else []) if i < len(df)]
picked = [r for r in picked if isinstance(r, str)]


def _compare(run_ids: list[str]) -> None:
    st.session_state[common.K_COMPARE] = list(dict.fromkeys(run_ids))
    st.session_state["_goto_runs"] = True


c1, c2 = st.columns(2)
c1.button(f"Compare the runs of the {len(picked)} selected trial(s)", disabled=not picked,
          on_click=_compare, args=(picked,), type="primary")
best_runs = []
if complete and not multi:
    ranked = sorted(complete, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    best_runs = [r for r in df.set_index("trial").loc[[t.number for t in ranked[:3]], "run"] if isinstance(r, str)]
c2.button(f"Compare the best {len(best_runs)} trials' runs", disabled=not best_runs, on_click=_compare,
          args=(best_runs,))
if st.session_state.pop("_goto_runs", False):
    st.switch_page("views/runs.py")
