"""Every dashboard page under Streamlit's AppTest, over real tiny runs of both methods plus broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"

GOOD = ["diff_digits", "vae_digits", "diff_bimodal"]
BAD = ["broken", "half_written", "failed", "weird"]
PAGES = ["views/runs.py", "views/reconstructions.py", "views/latents.py", "views/training.py",
         "views/rate_distortion.py", "views/tuning.py"]


def app(runs_dir: Path, compare: list[str] | None = None, page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["runs_dir"] = str(runs_dir)
    at.session_state["compare"] = list(compare or [])
    at.run()
    if page:
        at.switch_page(page).run()
    return at


def ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def plotly(at: AppTest) -> list:
    return at.get("plotly_chart")


def texts(at: AppTest, kind: str) -> str:
    return "\n".join(str(e.value) for e in getattr(at, kind))


# ------------------------------------------------------------------------------------- pages
def test_every_page_survives_every_run(runs_dir):
    """Good, running, failed, half-written and corrupt runs compared together: warnings, no exception."""
    at = app(runs_dir, GOOD + BAD + ["live"])
    for page in PAGES:
        at.switch_page(page).run()
        ok(at)
        assert at.title, f"{page} did not draw"
        if page not in ("views/tuning.py", "views/rate_distortion.py"):  # R–D names them in a caption
            assert at.warning, f"{page}: the broken runs were not warned about"


def test_runs_page_lists_everything_and_warns(runs_dir):
    at = app(runs_dir)
    ok(at)
    table = at.dataframe[0].value
    ids = set(table["run"] if "run" in table else table["id"])
    assert set(GOOD + BAD + ["live"]) <= ids
    assert {f"tune/demo/trial_{i:03d}" for i in range(5)} <= ids  # tuning trials are runs too
    assert {"method", "dataset", "state", "beta", "elbo_nats", "rate_nats", "problems"} <= set(table.columns)
    warned = texts(at, "warning")
    for name in ("broken", "failed", "weird"):
        assert name in warned
    assert "DivergenceError" in warned
    assert "half_written" in texts(at, "info") and "live" in texts(at, "info")
    row = table.set_index("run" if "run" in table else "id").loc["vae_digits"]
    assert row["method"] == "vae" and row["dataset"] == "digits" and row["beta"] == 0.5 and row["state"] == "done"

    next(t for t in at.text_input if t.label == "Filter by name").set_value("vae").run()
    ok(at)
    filtered = at.dataframe[0].value
    assert set(filtered.iloc[:, 0]) == {"vae_digits"}


def test_sidebar_selection_is_shared_across_pages(runs_dir):
    at = app(runs_dir)
    at.sidebar.multiselect[0].select("diff_digits").select("vae_digits").run()
    ok(at)
    assert at.session_state["compare"] == ["diff_digits", "vae_digits"]
    at.switch_page("views/reconstructions.py").run()
    ok(at)
    assert at.session_state["compare"] == ["diff_digits", "vae_digits"]
    assert len(at.image) == 6 * (1 + 2 * 2)


def test_reconstructions_side_by_side(runs_dir):
    at = app(runs_dir, ["diff_digits", "vae_digits", "diff_bimodal", "broken"], "views/reconstructions.py")
    ok(at)
    # digits: 6 test images × (original + amortised + refined for two runs); the toy gets a table
    assert len(at.image) == 6 * 5
    captions = [c for img in at.image for c in ([img.proto.imgs[0].caption] if img.proto.imgs else [])]
    assert sum(c.startswith("mse ") for c in captions) == 6 * 4 and any("label" in c for c in captions)
    assert len(plotly(at)) == 2  # per-image error for each group of shared test images
    assert "different test examples" in texts(at, "info")
    assert "broken" in texts(at, "warning")


def test_latents(runs_dir):
    at = app(runs_dir, ["diff_digits", "vae_digits", "diff_bimodal"], "views/latents.py")
    ok(at)
    summary = at.dataframe[0].value
    assert {"active_units", "aggregate_kl_to_prior_nats"} <= set(summary.columns)
    charts = plotly(at)
    # 3 per-dimension charts + histogram + one 2-D view per run + 4 posterior panels for the toy
    assert len(charts) == 3 + 1 + 3 + 4
    assert any("Posterior samples" in s.value for s in at.subheader)
    at.selectbox[1].set_value("(none)").run()  # colour by
    ok(at)


def test_training_curves_and_live_refresh(runs_dir):
    at = app(runs_dir, ["diff_digits", "vae_digits"], "views/training.py")
    ok(at)
    assert len(plotly(at)) >= 6
    assert not at.toggle or all(t.label != "Live refresh" for t in at.toggle)

    at = app(runs_dir, ["live", "diff_digits"], "views/training.py")
    ok(at)
    assert any(t.label == "Live refresh" and t.value for t in at.toggle)
    assert "Running:" in texts(at, "caption")
    assert len(plotly(at)) >= 4


def test_rate_distortion(runs_dir):
    at = app(runs_dir, ["diff_digits", "vae_digits"], "views/rate_distortion.py")
    ok(at)
    assert len(plotly(at)) == 1
    front = at.dataframe[0].value
    assert len(front) >= 1 and {"method", "beta", "rate_nats", "distortion_nats"} <= set(front.columns)
    assert set(front["id"]) <= {"diff_digits", "vae_digits", "live"} | {f"tune/demo/trial_{i:03d}" for i in range(5)}
    assert "broken" in texts(at, "caption")  # runs without a rate and a distortion are named, not plotted


def test_tuning(runs_dir):
    at = app(runs_dir, [], "views/tuning.py")
    ok(at)
    storages = at.selectbox[0].options
    assert any(s.endswith("demo.db") for s in storages) and any(s.endswith("journal.log") for s in storages)
    assert len(plotly(at)) == 4  # history, importances, parallel coordinates, intermediate values
    trials = at.dataframe[0].value
    assert len(trials) == 5 and set(trials["run"]) == {f"tune/demo/trial_{i:03d}" for i in range(5)}
    assert set(trials["state"]) == {"COMPLETE", "PRUNED"}

    best = next(b for b in at.button if b.label.startswith("Compare the best"))
    best.click().run()
    ok(at)
    assert len(at.session_state["compare"]) == 3
    assert all(r.startswith("tune/demo/") for r in at.session_state["compare"])
    assert any(t.value == "Runs" for t in at.title)  # switched to the Runs page

    at = app(runs_dir, [], "views/tuning.py")
    at.selectbox[0].set_value(next(s for s in storages if s.endswith("journal.log"))).run()
    ok(at)
    assert len(plotly(at)) >= 3


def test_no_selection_falls_back_to_recent_runs(runs_dir):
    at = app(runs_dir, [], "views/reconstructions.py")
    ok(at)
    assert "No runs selected" in texts(at, "info")
    assert len(at.image) > 0


def test_missing_or_empty_runs_folder(tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):
        at = app(root)
        for page in PAGES:
            at.switch_page(page).run()
            ok(at)
            assert at.info or at.error, f"{page}: says nothing about an empty runs folder"


# ----------------------------------------------------------------------------- pure helpers
def test_pareto_mask():
    from dashboard.figures import pareto_mask

    x = [1.0, 2.0, 3.0, 2.0, np.nan, 0.5]
    y = [5.0, 3.0, 1.0, 4.0, 0.0, 9.0]
    assert pareto_mask(x, y).tolist() == [True, True, True, False, False, True]


def test_pca_and_images():
    from dashboard.figures import image_of, pca_2d

    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 5)) * [5, 1, 0.1, 0.1, 0.1]
    xy, ratio = pca_2d(z)
    assert xy.shape == (200, 2) and ratio[0] > 0.8
    img = image_of(np.linspace(0, 1, 64), 8, 8)
    assert img.shape == (96, 96) and img.dtype == np.uint8 and img.max() == 255
    assert image_of(np.zeros(10), 8, 8) is None
    assert image_of(np.zeros(3 * 16), 4, 4).shape[-1] == 3


def test_runs_table_never_raises(runs_dir):
    from dashboard.common import build_runs_table

    t = build_runs_table(runs_dir)
    weird = t.set_index("id").loc["weird"]
    assert weird["health"] == "attention" and "status.json" in weird["problems"]
    assert pd.isna(weird["rate_nats"])  # text in a numeric metric is not a number
    assert t.set_index("id").loc["diff_digits", "health"] == "ok"
    assert t.set_index("id").loc["live", "health"] == "running"


def test_launch_binds_to_loopback(tmp_path):
    from dashboard import launch

    cmd = launch.command()
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    env = launch.environment(tmp_path, "runs/tune/x.db")
    assert env["DIFFENC_RUNS_DIR"] == str(tmp_path.resolve())
    assert env["DIFFENC_OPTUNA_STORAGE"].startswith("sqlite:///") and env["DIFFENC_OPTUNA_STORAGE"].endswith("x.db")


def test_storage_discovery(runs_dir, tmp_path):
    from dashboard import optuna_io

    found = optuna_io.discover(runs_dir)
    assert len(found) == 2
    (tmp_path / "notes.log").write_text("plain text\n")
    (tmp_path / "other.db").write_bytes(b"not sqlite")
    assert optuna_io.discover(tmp_path) == []  # foreign files are never opened as studies
    with pytest.raises(FileNotFoundError):
        optuna_io.open_storage(str(tmp_path / "missing.db"))
    assert not (tmp_path / "missing.db").exists()
