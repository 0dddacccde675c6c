"""``diffenc serve`` without ``--limit`` (issue 19 items 12 and 15): the runner gets a limit from the
machine (cores, available memory) and polls often enough to keep its slots busy.

Before the fix ``Runner(limit=None)`` started every queued flow run at once (12 queued → 12
processes of ~370 MB), and the runner asked for runs every 10 s (Prefect's default) while slots
stood idle. No Prefect server here: the runner is replaced by a recorder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from diffenc_core.errors import ConfigError
from flows import serve

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """Stands in for ``prefect.runner.Runner``: records how it was made, serves nothing, returns."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        Recorder.made.append(kwargs)

    def add_deployment(self, dep) -> None:
        pass

    async def start(self) -> None:
        return None


@pytest.fixture
def recorded(monkeypatch, in_tmp):
    """``serve.main`` with a recording runner, a configured API and no deployments to build."""
    monkeypatch.setenv("PREFECT_HOME", str(in_tmp / "prefect-home"))  # never ~/.prefect
    import prefect.runner

    Recorder.made = []
    monkeypatch.setattr(prefect.runner, "Runner", Recorder)
    monkeypatch.setattr(serve, "_require_api", lambda: "http://127.0.0.1:1/api")
    monkeypatch.setattr(serve, "deployments", lambda params, sets: [])
    monkeypatch.delenv(serve.POLL_ENV, raising=False)
    return Recorder.made


def test_default_limit_follows_cores_and_memory():
    mb = serve.MB_PER_RUN
    assert serve.default_limit(cores=2, memory_mb=24 * 1024) == 2  # this machine: the cores bound it
    assert serve.default_limit(cores=16, memory_mb=64 * 1024) == 16
    assert serve.default_limit(cores=16, memory_mb=5 * mb + 1) == 5  # memory bounds it
    assert serve.default_limit(cores=1, memory_mb=mb / 2) == serve.MIN_LIMIT  # a sweep's parent holds a slot


def test_available_memory_is_read(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    2048000 kB\n")
    monkeypatch.setattr(serve, "MEMINFO", meminfo)
    assert serve.available_mb() == 2000
    assert serve.usable_cores() >= 1


def test_serve_without_limit_uses_the_machine_default(recorded, monkeypatch, capsys):
    monkeypatch.setattr(serve, "usable_cores", lambda: 3)
    monkeypatch.setattr(serve, "available_mb", lambda: 100 * serve.MB_PER_RUN)
    assert serve.main(params=None) == 0
    assert len(recorded) == 1 and recorded[0]["limit"] == 3, recorded
    assert recorded[0]["query_seconds"] == serve.RUNNER_POLL_S < 10  # Prefect's default left slots idle
    assert "at most 3 flow runs at once" in capsys.readouterr().out


def test_an_explicit_limit_and_poll_interval_win(recorded, monkeypatch):
    monkeypatch.setenv(serve.POLL_ENV, "0.5")
    assert serve.main(params=None, limit=7) == 0
    assert recorded[0]["limit"] == 7 and recorded[0]["query_seconds"] == 0.5


@pytest.mark.parametrize("limit", [0, -2])
def test_a_limit_below_one_is_one_line(recorded, limit, capsys):
    assert serve.cli(["--limit", str(limit)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --limit {limit}: must be at least 1 flow run at once"] and not recorded


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_a_bad_poll_interval_is_one_line(recorded, monkeypatch, value):
    monkeypatch.setenv(serve.POLL_ENV, value)
    with pytest.raises(ConfigError, match=f"PREFECT_RUNNER_POLL_FREQUENCY='{value}': expected a number of seconds"):
        serve.main(params=None)
    assert not recorded


def test_help_states_the_default():
    out = subprocess.run([sys.executable, "-m", "flows.serve", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "default: one per core" in " ".join(out.split()) and f"{serve.MB_PER_RUN} MB" in out
