"""The Tuning page never shows a database password (issue 19: PostgreSQL storages)."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def page(root: Path, view: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=90)
    at.session_state["runs_dir"] = str(root)
    at.run()
    at.switch_page(view).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_database_password_is_never_shown(tmp_path, monkeypatch):
    """A PostgreSQL storage with its password (``--storage`` / DIFFENC_OPTUNA_STORAGE) is named with the
    password masked, in the picker and in the warning when it cannot be opened (port 1: refused)."""
    monkeypatch.setenv("DIFFENC_OPTUNA_STORAGE", "postgresql://me:s3cret@127.0.0.1:1/optuna")
    at = page(tmp_path, "views/tuning.py")
    shown = [*at.selectbox[0].options, *(w.value for w in at.warning)]
    assert "postgresql://me:***@127.0.0.1:1/optuna" in shown[0]
    assert any("Cannot open `postgresql://me:***@127.0.0.1:1/optuna`" in w for w in shown[1:]), shown
    assert not any("s3cret" in str(v) for v in shown)
