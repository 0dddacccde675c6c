"""The run index behind every page (issue 12 items 9 and 10), over copies of the real tiny runs.

* unchanged runs are never re-read, by the index itself or across renders and sessions of the app;
  a changed, added or removed run is picked up;
* a run that is simply not evaluated yet is a neutral state, not a "needs attention" warning;
* a broken params.yaml is one message; many broken runs do not flood the Runs page.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import index
from diffenc_core import runs

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
N_COPIES = 4
NOT_EVALUATED_FILES = (runs.METRICS, runs.RECON, runs.LATENTS, runs.POSTERIOR)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(runs.CHECKPOINTS))
    return dst


@pytest.fixture
def folder(runs_dir, tmp_path) -> Path:
    """A fresh runs folder: ``N_COPIES`` copies of the real diff_digits run (a new path: a new index)."""
    root = tmp_path / "runs"
    for i in range(N_COPIES):
        _copy(runs_dir / "diff_digits", root / f"run_{i}")
    return root


def _app(root: Path, compare: list[str] | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["runs_dir"] = str(root)
    at.session_state["compare"] = list(compare or [])
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _reevaluate(root: Path, rid: str) -> float:
    """Rewrite a run's metrics.json (atomically, as ``diffenc evaluate`` does) with a new ELBO."""
    run = runs.Run(root / rid)
    m = run.metrics()
    m["elbo_nats"] = float(m["elbo_nats"]) - 1.0
    run.write_metrics(m)
    return m["elbo_nats"]


# ------------------------------------------------------------------------------------ item 9
def test_index_rereads_only_changed_runs(folder, runs_dir):
    idx = index.RunIndex(folder, reuse_s=0)
    first = idx.table()
    assert idx.reads == N_COPIES and sorted(first["id"]) == [f"run_{i}" for i in range(N_COPIES)]
    assert idx.table().equals(first) and idx.reads == N_COPIES  # nothing changed: nothing re-read

    elbo = _reevaluate(folder, "run_1")
    t = idx.table().set_index("id")
    assert idx.reads == N_COPIES + 1 and t.loc["run_1", "elbo_nats"] == pytest.approx(elbo)
    assert t.loc["run_0", "elbo_nats"] != pytest.approx(elbo)

    _copy(runs_dir / "vae_digits", folder / "nested" / "vae")  # runs can sit deeper (tuning trials)
    shutil.rmtree(folder / "run_2")
    t = idx.table().set_index("id")
    assert idx.reads == N_COPIES + 2
    assert "nested/vae" in t.index and t.loc["nested/vae", "method"] == "vae" and "run_2" not in t.index


def test_index_finds_what_find_runs_finds(runs_dir):
    """The scandir walk and ``diffenc_core.runs.find_runs`` agree on the test folder (broken runs included)."""
    ids = [rid for rid, _, _ in index.scan(runs_dir).runs]
    assert ids == sorted(r.path.relative_to(runs_dir).as_posix() for r in runs.find_runs(runs_dir))
    assert any(s.endswith("demo.db") for s in index.scan(runs_dir).storages)


def test_app_renders_reuse_the_index(folder, monkeypatch):
    """Page switches, reruns and new sessions read no unchanged run again; a changed run is re-read."""
    calls: list[str] = []
    real = index.summarise

    def counting(rid, path, stamps):
        calls.append(rid)
        return real(rid, path, stamps)

    monkeypatch.setattr(index, "summarise", counting)
    at = _app(folder)
    at.run()
    _ok(at)
    assert sorted(calls) == [f"run_{i}" for i in range(N_COPIES)]
    for page in ("views/rate_distortion.py", "views/training.py", "views/runs.py"):
        at.switch_page(page).run()
        _ok(at)
    other = _app(folder)  # a second browser tab
    other.run()
    _ok(other)
    assert len(calls) == N_COPIES, f"unchanged runs were read again: {calls[N_COPIES:]}"

    elbo = _reevaluate(folder, "run_3")
    time.sleep(2 * index.SCAN_REUSE_S)  # past the window in which one script run shares a scan
    at.run()
    _ok(at)
    assert calls[N_COPIES:] == ["run_3"]
    shown = at.dataframe[0].value.set_index("id")
    assert shown.loc["run_3", "elbo_nats"] == pytest.approx(elbo)


# ----------------------------------------------------------------------------------- item 10
def test_not_evaluated_is_neutral(folder):
    """A trained run without metrics.json: an info line and health "not evaluated", no warning."""
    for name in NOT_EVALUATED_FILES:
        (folder / "run_0" / name).unlink()
    at = _app(folder)
    at.run()
    _ok(at)
    assert not at.warning, [w.value for w in at.warning]
    assert "run_0" in "\n".join(str(i.value) for i in at.info)
    table = at.dataframe[0].value.set_index("id")
    assert table.loc["run_0", "health"] == index.NOT_EVALUATED and table.loc["run_1", "health"] == index.OK
    assert "attention" not in "\n".join(str(c.value) for c in at.sidebar.caption)

    for page in ("views/reconstructions.py", "views/latents.py"):
        at.session_state["compare"] = ["run_0", "run_1"]
        at.switch_page(page).run()
        _ok(at)
        assert not at.warning, f"{page}: {[w.value for w in at.warning]}"
        assert any("run_0" in str(i.value) and "not evaluated" in str(i.value) for i in at.info)


def test_broken_params_is_one_message(folder):
    (folder / "run_0" / runs.PARAMS).write_text("train: [unclosed\n")
    (folder / "run_1" / runs.PARAMS).write_text("- a list\n- not a mapping\n")
    t = index.RunIndex(folder).table().set_index("id")
    for rid in ("run_0", "run_1"):
        assert t.loc[rid, "health"] == index.ATTENTION
        assert t.loc[rid, "problems"].count(runs.PARAMS) == 1, t.loc[rid, "problems"]
        assert f"{runs.PARAMS}: missing" not in t.loc[rid, "problems"]  # it is there, it is broken
    assert "unreadable" in t.loc["run_0", "problems"]
    (folder / "run_3" / runs.PARAMS).unlink()  # a run with status.json only really lacks its params.yaml
    assert f"{runs.PARAMS}: missing" in index.RunIndex(folder).table().set_index("id").loc["run_3", "problems"]


def test_many_broken_runs_do_not_flood_the_runs_page(tmp_path):
    """More than a few broken runs: the first ones in full, the rest named in one line."""
    n_failed = 12
    root = tmp_path / "runs"
    for i in range(n_failed):
        run = runs.create(root, f"failed_{i:02d}")
        run.set_status("failed", error=f"DivergenceError: step {i}")
    at = _app(root)
    at.run()
    _ok(at)
    warnings = [str(w.value) for w in at.warning]
    assert len(warnings) < n_failed
    assert "failed_00" in warnings[0]
    assert any(f"failed_{n_failed - 1}" in w and "more run(s) need attention" in w for w in warnings), warnings
    assert len(at.dataframe[0].value) == n_failed
