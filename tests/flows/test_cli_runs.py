"""Runs through ``diffenc`` as a user meets them: a read-only runs folder in a real process, and what
replacing or resuming a run does to its files (issue 19: nothing removed unless everything can be, the
old evaluation dropped when a run trains further, one rule for links, the umask). The bad-input matrix
itself is ``test_bad_input.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
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
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny profile's data prepared under ``data/``."""
    root = tmp_path_factory.mktemp("cli")
    data.prepare(config.load(None, [f"data.root={root / 'data'}"]).data)
    return root


@pytest.fixture
def read_only(tmp_path: Path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mount:
        yield mount


def test_a_read_only_runs_folder_is_one_line_in_a_real_process(prepared, read_only):
    """Issue 12 #2, as the issue ran it: `diffenc train` on a read-only mount, no traceback."""
    args = [sys.executable, "-m", "flows.cli", "train", "--no-progress", *sets(prepared),
            "--set", f"train.runs_dir={read_only}", "--set", "train.run=ro"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFENC_PREFECT": "0", "PYTHONPATH": str(REPO)}
    res = subprocess.run(args, cwd=prepared, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {read_only}/ro: cannot write (Read-only file system); "
                                               "check train.runs_dir"], res.stderr


# ------------------------------------------------------------------ issue 19: runs that are replaced or resumed
def cli(root: Path, *args: str, monkeypatch: pytest.MonkeyPatch):
    """``diffenc ARGS`` in-process (no Prefect), from ``root``."""
    monkeypatch.setenv("DIFFENC_PREFECT", "0")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(root)
    return CliRunner().invoke(app, list(args))


def sets(root: Path, *extra: str) -> list[str]:
    out: list[str] = []
    for s in tiny(f"data.root={root / 'data'}", f"train.runs_dir={root / 'runs'}", "train.method=vae", *extra):
        out += ["--set", s]
    return out


@pytest.fixture
def vae(tmp_path: Path) -> Path:
    """A finished tiny VAE run ``runs/vae`` with the files of an evaluation, in its own folder."""
    cfg = config.load(None, tiny(f"data.root={tmp_path / 'data'}", f"train.runs_dir={tmp_path / 'runs'}",
                                 "train.method=vae"))
    data.prepare(cfg.data)
    run = trainer.train(cfg, progress=False)
    run.write_metrics({"rate_nats": 1.0, "method": "vae"})
    run.write_table(runs.RECON, pd.DataFrame({"x": [1.0]}))
    (run.plots_dir / "latents.png").write_bytes(b"png")
    return run.path


@contextlib.contextmanager
def unwritable(folder: Path):
    """``folder``, its files kept, made unwritable: a read-only tmpfs over it as root, else its permissions."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with tmpfs(folder, "size=16m") as mount:
        for name, body in saved.items():
            (mount / name).write_bytes(body)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield


def test_overwrite_removes_nothing_unless_it_can_remove_everything(vae, monkeypatch):
    """Issue 19 #4: --overwrite with an unwritable checkpoints/ deleted plots, metrics, history and
    params.yaml, then failed without naming the path, after saying 'replacing …'."""
    root = vae.parent.parent
    with unwritable(vae / runs.CHECKPOINTS):
        before = checksums(vae)
        res = cli(root, "train", *sets(root), "--overwrite", monkeypatch=monkeypatch)
        assert checksums(vae) == before
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [
        f"error: {vae / runs.CHECKPOINTS}: cannot remove the old run's files (Read-only file system); "
        f"nothing of {vae} was removed" if os.geteuid() == 0 else
        f"error: {vae / runs.CHECKPOINTS}: cannot remove the old run's files (Permission denied); "
        f"nothing of {vae} was removed"], res.stderr
    assert "replacing" not in res.stdout


def test_overwrite_says_replacing_once_the_old_files_are_gone(vae, monkeypatch):
    """Issue 19 #4: the line comes after the removal it announces (in the log of the library)."""
    root = vae.parent.parent
    seen: list[tuple[str, bool]] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), (vae / runs.METRICS).exists()))

    spy = Spy()
    logging.getLogger("diffenc_core").addHandler(spy)
    try:
        res = cli(root, "train", *sets(root), "--overwrite", "--no-progress", monkeypatch=monkeypatch)
    finally:
        logging.getLogger("diffenc_core").removeHandler(spy)
    assert res.exit_code == 0, res.output
    line = f"replacing {vae} (every file of the old run removed)"
    assert (line, False) in seen and line in res.stdout.splitlines()
    assert not (vae / runs.METRICS).exists() and (vae / runs.STATUS).exists()


def test_a_resume_that_trains_further_drops_the_old_evaluation(vae, monkeypatch):
    """Issue 19 #7: a resumed run kept metrics.json and its tables and plots of an earlier checkpoint."""
    root = vae.parent.parent
    res = cli(root, "train", *sets(root), "--resume", "--no-progress", monkeypatch=monkeypatch)
    assert res.exit_code == 0, res.output
    assert (vae / runs.METRICS).exists() and (vae / runs.RECON).exists()  # nothing trained: still current
    assert "resuming vae from step 20" in res.stdout.splitlines()  # the start line, plain, on stdout
    res = cli(root, "train", *sets(root, "train.steps=25"), "--resume", "--no-progress", monkeypatch=monkeypatch)
    assert res.exit_code == 0, res.output
    assert not any((vae / name).exists() for name in (runs.METRICS, runs.RECON, runs.LATENTS))
    assert not list((vae / runs.PLOTS).iterdir())
    assert runs.Run(vae).status()["steps"] == 25


def test_the_start_reads_the_step_from_the_status_not_the_checkpoint(vae, monkeypatch):
    """Issue 18 #5: starting a run read the whole checkpoint just to learn its config and step."""
    from diffenc_core import checkpoint, runstart

    cfg = config.load(None, tiny(f"data.root={vae.parent.parent / 'data'}", f"train.runs_dir={vae.parent}",
                                 "train.method=vae", "train.steps=30"))
    reads: list[Path] = []
    real = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, *a, **k: reads.append(Path(path)) or real(path, *a, **k))
    status = runs.Run(vae).status()
    status.pop(runstart.CHECKPOINT_STEP, None)
    runs.atomic_write_json(vae / runs.STATUS, status)
    assert runstart.plan(cfg, "resume").step == 20 and len(reads) == 1  # a run from before: read once
    runs.Run(vae).set_status("done", **{runstart.CHECKPOINT_STEP: 20})
    reads.clear()
    plan = runstart.plan(cfg, "resume")
    assert (plan.step, plan.message, reads) == (20, "resuming vae from step 20", [])


def test_one_rule_for_links_in_train_run_and_warm_start(vae, monkeypatch):
    """Issue 19 #3: train.warm_start followed a link out of train.runs_dir, train.run refused one inside."""
    from diffenc_core import runstart

    root = vae.parent.parent
    (vae.parent / "alias").symlink_to(vae)  # inside runs/: the same run under another name
    (root / "outside").mkdir()
    (vae.parent / "out").symlink_to(root / "outside")
    assert runstart.run_path(vae.parent, "alias", "train.warm_start") == vae.resolve()
    res = cli(root, "train", *sets(root, "train.run=alias"), "--resume", "--no-progress", monkeypatch=monkeypatch)
    assert res.exit_code == 0 and "resuming alias from step 20" in res.stdout, res.output
    for key, extra in (("train.run", ()), ("train.warm_start", ("train.method=diffusion", "train.run=warm"))):
        before = checksums(root)
        res = cli(root, "train", *sets(root, *extra, f"{key}=out"), monkeypatch=monkeypatch)
        assert res.exit_code == 2, res.output
        assert res.stderr.strip().splitlines() == [
            f"error: {key}: {vae.parent / 'out'} resolves outside train.runs_dir ({vae.parent}), to "
            f"{(root / 'outside').resolve()}; a run name may link only to a folder inside it"], res.stderr
        assert checksums(root) == before


def test_run_files_and_folders_follow_the_umask(tmp_path):
    """Issue 19 #9: run files were written 0600 (the temporary file's mode survived the rename)."""
    old = os.umask(0o022)
    try:
        cfg = config.load(None, tiny(f"data.root={tmp_path / 'data'}", f"train.runs_dir={tmp_path / 'runs'}",
                                     "train.method=vae"))
        data.prepare(cfg.data)
        run = trainer.train(cfg, progress=False)
        os.umask(0o002)
        runs.atomic_write_text(run.file("note.txt"), "x")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run.path)): p.stat().st_mode & 0o777 for p in run.path.rglob("*")}
    assert modes.pop("note.txt") == 0o664
    assert {m for p, m in modes.items() if (run.path / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (run.path / p).is_dir()} == {0o755}, modes
