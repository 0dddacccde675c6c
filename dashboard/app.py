"""diffenc dashboard: ``streamlit run dashboard/app.py`` (or ``diffenc dashboard --runs-dir runs``).

Reads run directories (through ``diffenc_core.runs``) and Optuna storage; never trains.
The sidebar holds what every page shares: the runs folder and the runs chosen for comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402
from PIL import Image  # noqa: E402

from dashboard import common, figures, index  # noqa: E402

# an image, not a ":material/…" icon, which the browser would fetch from Google's font CDN
st.set_page_config(page_title="diffenc dashboard", page_icon=Image.fromarray(figures.icon()), layout="wide")

PAGES = [
    st.Page("views/runs.py", title="Runs", icon=":material/table_rows:", default=True),
    st.Page("views/reconstructions.py", title="Reconstructions", icon=":material/image:"),
    st.Page("views/latents.py", title="Latents", icon=":material/scatter_plot:"),
    st.Page("views/training.py", title="Training", icon=":material/show_chart:"),
    st.Page("views/rate_distortion.py", title="Rate–distortion", icon=":material/balance:"),
    st.Page("views/tuning.py", title="Tuning", icon=":material/tune:"),
]
nav = st.navigation(PAGES)

st.session_state.setdefault(common.K_RUNS_DIR, common.default_runs_dir())
st.session_state.setdefault(common.K_COMPARE, [])

with st.sidebar:
    st.text_input("Runs folder", key=common.K_RUNS_DIR, help="folder holding run directories (searched recursively)")
    root = common.runs_root()
    table = common.runs_table()
    if not root.is_dir():
        st.error(f"`{root}` is not a folder")
    ids = list(table["id"])
    labels = common.run_labels(table)
    common.prune_compare(ids)
    st.multiselect(
        "Runs to compare", options=ids, key=common.K_COMPARE, format_func=lambda r: labels.get(r, r),
        help="shared by every page; also set by selecting rows on the Runs page", placeholder="choose runs",
    )
    counts = table["health"].value_counts() if "health" in table else {}
    notes = [f"{counts[h]} {what}" for h, what in ((index.ATTENTION, "need attention"),
                                                   (index.NOT_EVALUATED, "not evaluated")) if counts.get(h)]
    st.caption(" · ".join([f"{len(table)} run(s) found", *notes]))
    if st.button("Reload runs", help="re-read every run now (changed runs are picked up by themselves anyway)"):
        common.reload()
        st.rerun()

nav.run()
