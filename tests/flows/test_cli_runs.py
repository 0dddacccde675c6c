"""The bad-input matrix of ``diffenc`` against an existing run (issue 12): every user mistake ends
in one ``error:`` line and exit status 2, and no file of the existing run (or of a tuning study
beside it) changes: checksums before and after. The read-only runs folder runs in a real process.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mounts import tmpfs
from tiny import tiny
from typer.testing import CliRunner

from diffenc_core import config, data, runs, trainer
from flows.cli import app

REPO = Path(__file__).resolve().parents[2]


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished VAE run ``runs/vae`` (with an evaluation's files and dvclive's), a tuning study's
    folder ``runs/tune`` and a plain file, all under one temporary folder."""
    root = tmp_path_factory.mktemp("cli")
    sets = tiny(f"data.root={root / 'data'}", f"train.runs_dir={root / 'runs'}", "train.method=vae")
    cfg = config.load(None, sets)
    data.prepare(cfg.data)
    run = trainer.train(cfg, progress=False)
    run.write_metrics({"rate_nats": 1.0, "method": "vae"})
    (run.path / runs.LIVE).mkdir()
    (run.path / runs.LIVE / "metrics.json").write_text("{}")
    (root / "runs" / "tune" / "study" / "0").mkdir(parents=True)
    (root / "runs" / "tune" / "study.db").write_text("optuna")
    (root / "afile").write_text("not a folder")
    return {"root": root, "run": run.path, "runs": root / "runs"}


def base(world: dict[str, Path]) -> list[str]:
    args: list[str] = []
    for s in tiny(f"data.root={world['root'] / 'data'}", f"train.runs_dir={world['runs']}", "train.method=vae"):
        args += ["--set", s]
    return args


CASES = {
    # issue 12 #1: a finished run is never replaced by accident
    "existing run": (["train"], "already holds a run (done): continue it with --resume, replace it with --overwrite"),
    # #7: changed settings are named, not a torch size-mismatch dump
    "resume, other settings": (["train", "--resume", "--set", "model.latent_dim=8"], "model.latent_dim: 4 → 8"),
    "resume and overwrite": (["train", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    # #3: a run name is a name
    "run ..": (["train", "--set", "train.run=../vae"], "--set train.run: must be one folder name"),
    "run absolute": (["train", "--set", "train.run=/tmp/x"], "--set train.run: must be one folder name"),
    "warm start ..": (["train", "--set", "train.warm_start=../vae"], "--set train.warm_start: must be one folder"),
    "overwrite a study": (["train", "--overwrite", "--set", "train.run=tune"], "holds files no run writes"),
    # #2: a file where the runs folder belongs
    "runs_dir is a file": (["train", "--set", "train.runs_dir={root}/afile"],
                           "cannot write (a file stands where a folder is needed); check train.runs_dir"),
    "data.root is a file": (["prepare", "--set", "data.root={root}/afile"],
                            "cannot write (a file stands where a folder is needed); check data.root"),
    # #10: a bad --set is named as such
    "bad --set value": (["train", "--set", "train.steps=0"], "--set train.steps: Input should be greater"),
    "compare into a run": (["compare", "--run", "{run}", "--out", "{run}/cmp"], "--out: "),
    "evaluate no run": (["evaluate", "--run", "{root}/runs/nothing"], "not a run directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mistake_is_one_line_exit_2_and_changes_nothing(world, case, monkeypatch):
    monkeypatch.setenv("DIFFENC_PREFECT", "0")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(world["root"])  # no params.yaml there: the built-in defaults plus the tiny profile
    args, needle = CASES[case]
    args = [a.format(root=world["root"], run=world["run"]) for a in args]
    before = checksums(world["runs"])
    res = CliRunner().invoke(app, [args[0], *base(world), *args[1:]])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert checksums(world["runs"]) == before
    assert sorted(p.name for p in world["runs"].iterdir()) == ["tune", "vae"], "nothing new was made"


@pytest.fixture
def read_only(tmp_path: Path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        yield mount


def test_a_read_only_runs_folder_is_one_line_in_a_real_process(world, read_only):
    """Issue 12 #2, as the issue ran it: `diffenc train` on a read-only mount, no traceback."""
    args = [sys.executable, "-m", "flows.cli", "train", "--no-progress", *base(world),
            "--set", f"train.runs_dir={read_only}", "--set", "train.run=ro"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFENC_PREFECT": "0", "PYTHONPATH": str(REPO)}
    res = subprocess.run(args, cwd=world["root"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {read_only}/ro: cannot write (Read-only file system); "
                                               "check train.runs_dir"], res.stderr
