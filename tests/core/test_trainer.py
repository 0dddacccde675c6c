"""The training loop: run directory, bit-identical resume after a kill or a SIGTERM, how a run starts
(new / resume / overwrite), failures, bad checkpoints, a full disk."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mounts import tmpfs
from tiny import tiny

from diffenc_core import checkpoint, config, data, runs, runstart, trainer
from diffenc_core.errors import CheckpointError, ConfigError, DataError, DivergenceError, RunError, StorageError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = config.load(None, [f"data.root={root}"])
    data.prepare(cfg.data)
    return root


def _cfg(prepared, tmp_path, *sets):
    return config.load(None, tiny(f"data.root={prepared}", f"train.runs_dir={tmp_path / 'runs'}", *sets))


def _params(run: runs.Run) -> dict[str, torch.Tensor]:
    return checkpoint.load(run.checkpoint_dir / "last.pt")["models"]


@pytest.mark.parametrize("method", ["diffusion", "vae"])
def test_run_directory_is_complete(prepared, tmp_path, method):
    run = trainer.train(_cfg(prepared, tmp_path, f"train.method={method}"), progress=False)
    status = run.status()
    assert status["state"] == "done" and status["steps"] == 20 and "torch" in status["versions"]
    assert config.load(run.file(runs.PARAMS)).train.method == method
    hist = run.history()
    assert list(hist["step"]) == [5, 10, 15, 20]
    assert hist["val_neg_elbo"].notna().sum() == 2
    state = checkpoint.load(run.checkpoint_dir / "last.pt")
    assert state["step"] == 20 and (run.checkpoint_dir / "best.pt").exists()
    if method == "diffusion":
        assert bool(state["models"]["has_chain"].any()), "persistent chains are saved"


def _reached(run_dir: Path, sig: int, step: int) -> bool:
    """SIGKILL: a checkpoint at ``step`` or later exists; SIGTERM: the history got there (no checkpoint yet)."""
    if sig == signal.SIGKILL:
        last = run_dir / "checkpoints" / "last.pt"
        return last.exists() and checkpoint.load(last)["step"] >= step
    hist = runs.Run(run_dir).history()
    return hist is not None and len(hist) > 0 and hist["step"].max() >= step


# SIGKILL: checkpoints every 5 steps, the run resumes from the last; SIGTERM: no checkpoint is due
# before the end, so the one the signal writes is the only one (no step lost).
@pytest.mark.parametrize(("sig", "checkpoint_every"), [(signal.SIGKILL, 5), (signal.SIGTERM, 1000)],
                         ids=["sigkill", "sigterm"])
def test_resume_after_a_kill_is_bit_identical(prepared, tmp_path, sig, checkpoint_every):
    sets = ["train.steps=60", f"train.checkpoint_every={checkpoint_every}", "train.log_every=5", "train.val_every=30"]
    straight = trainer.train(_cfg(prepared, tmp_path / "a", *sets), progress=False)

    cfg_b = _cfg(prepared, tmp_path / "b", *sets)
    total = cfg_b.total_steps
    args = [sys.executable, "-m", "flows.cli", "train", "--no-progress"]
    for s in tiny(f"data.root={prepared}", f"train.runs_dir={tmp_path / 'b' / 'runs'}", *sets):
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFENC_PREFECT": "0"}
    proc = subprocess.Popen(args, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "b" / "runs" / "diffusion"
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if _reached(run_dir, sig, 15):
            break
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    killed_at = checkpoint.load(last)["step"]
    assert 15 <= killed_at < total
    status = runs.Run(run_dir).status()
    if sig == signal.SIGKILL:
        assert status["state"] == "running", "a killed run is left running"
    else:  # the current step ends, last.pt is written at it, the status says so, exit 128 + 15
        assert proc.returncode == 143, stderr
        assert status["state"] == "interrupted" and status["steps"] == killed_at and status["signal"] == "SIGTERM"
        assert stderr.count("\n") == 1 and "SIGTERM at step" in stderr and "--resume" in stderr, stderr

    resumed = trainer.train(cfg_b, "resume", progress=False)
    assert resumed.status()["resumed_from"] == killed_at
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    ha, hb = straight.history(), resumed.history()
    assert list(ha["step"]) == list(hb["step"])
    assert ha["recon_nll"].tolist() == hb["recon_nll"].tolist()


def checksums(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with the SHA-256 of its bytes: "nothing changed" is equality."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_never_replaces_an_existing_one(prepared, tmp_path):
    """Issue 12 #1: the default start refuses a folder that holds a run, naming the ways out."""
    cfg = _cfg(prepared, tmp_path, "train.method=vae")
    run = trainer.train(cfg, progress=False)
    (run.path / runs.METRICS).write_text("{}")
    before = checksums(run.path)
    with pytest.raises(RunError, match=r"already holds a run \(done\).*--resume.*--overwrite.*train\.run="):
        trainer.train(cfg, progress=False)
    assert checksums(run.path) == before


def test_overwrite_removes_every_file_of_the_old_run(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, "train.method=vae")
    run = trainer.train(cfg, progress=False)
    for name in (runs.METRICS, runs.RECON, runs.POSTERIOR, "live/metrics.json", "live/plots/metrics/x.tsv"):
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_text("old")
    plan = runstart.plan(cfg, "overwrite")
    assert plan.clear and not plan.resume and not plan.message and plan.cleared.startswith("replacing")
    trainer.train(cfg, plan, progress=False)
    left = set(checksums(run.path))
    assert left == {"status.json", "params.yaml", "history.parquet", "checkpoints/last.pt", "checkpoints/best.pt"}


def test_overwrite_refuses_a_folder_that_is_not_a_run(prepared, tmp_path):
    """A mistyped name must not delete a study or a folder of runs: only a run's own files go."""
    cfg = _cfg(prepared, tmp_path, "train.method=vae", "train.run=tune")
    study = tmp_path / "runs" / "tune"
    (study / "langevin" / "0").mkdir(parents=True)
    (study / "langevin.db").write_text("optuna")
    before = checksums(study)
    with pytest.raises(RunError, match="holds files no run writes"):
        trainer.train(cfg, "overwrite", progress=False)
    assert checksums(study) == before


def test_resume_names_the_changed_keys_and_changes_nothing(prepared, tmp_path):
    """Issue 12 #7: a resume with other settings is refused before torch sees a size mismatch."""
    cfg = _cfg(prepared, tmp_path, "train.method=vae")
    run = trainer.train(cfg, progress=False)
    before = checksums(run.path)
    other = _cfg(prepared, tmp_path, "train.method=vae", "model.latent_dim=8", "train.beta=0.5")
    with pytest.raises(ConfigError) as err:
        trainer.train(other, "resume", progress=False)
    assert "model.latent_dim: 4 → 8" in str(err.value) and "train.beta: 1.0 → 0.5" in str(err.value)
    assert "size mismatch" not in str(err.value) and "\n" not in str(err.value)
    assert checksums(run.path) == before
    # what may differ: the budget, threads, device, paths, eval.* and tune.*
    longer = _cfg(prepared, tmp_path, "train.method=vae", "train.steps=25", "train.threads=2", "eval.iwae_k=2")
    plan = runstart.plan(longer, "resume")
    assert plan.resume and plan.message == "resuming vae from step 20"
    assert trainer.train(longer, plan, progress=False).status()["steps"] == 25


def test_resume_of_a_missing_run_starts_it_and_says_so(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, "train.method=vae", "train.run=fresh")
    plan = runstart.plan(cfg, "resume")
    assert not plan.resume and "has no run to resume: starting it fresh" in plan.message
    assert trainer.train(cfg, plan, progress=False).status()["state"] == "done"


def test_a_run_folder_that_is_a_link_out_of_runs_dir_is_refused(prepared, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path / "elsewhere")
    cfg = _cfg(prepared, tmp_path, "train.method=vae", "train.run=link")
    with pytest.raises(ConfigError, match="train.run: .* resolves outside train.runs_dir"):
        trainer.train(cfg, "overwrite", progress=False)
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """Issue 12 #2 without root: a full disk during the write is a StorageError, nothing half-written."""
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save(path, {"step": 1, "w": torch.zeros(3)})
    before = path.read_bytes()

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(StorageError, match="cannot write \\(No space left on device\\)"):
        checkpoint.save(path, {"step": 2, "w": torch.ones(3)})
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.pt"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 KiB tmpfs: room for the first last.pt + best.pt of a tiny VAE run, not for a third."""
    with tmpfs(tmp_path / "disk", "size=300k") as mount:
        yield mount


def test_a_full_disk_keeps_the_previous_checkpoint(prepared, tmp_path, tiny_disk):
    cfg = config.load(None, tiny(f"data.root={prepared}", f"train.runs_dir={tiny_disk}", "train.method=vae"))
    with pytest.raises(StorageError, match=r"last.pt: cannot write \(No space left on device\)"):
        trainer.train(cfg, progress=False)
    ckpt = tiny_disk / "vae" / "checkpoints"
    assert checkpoint.load(ckpt / "last.pt")["step"] == 10  # the previous one, whole
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt"], "no temporary file is left"
    assert runs.Run(tiny_disk / "vae").status()["state"] == "failed"


def test_divergence_marks_the_run_failed_and_never_checkpoints_nan(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, "em.e_step=ula", "em.step_size=50", "em.step_size_max=50",
               "em.langevin_steps=20", "em.max_retries=1")
    with pytest.raises(DivergenceError, match="E-step diverged"):
        trainer.train(cfg, progress=False)
    run = runs.open_run(tmp_path / "runs" / "diffusion")
    status = run.status()
    assert status["state"] == "failed" and "DivergenceError" in status["error"]
    assert not (run.checkpoint_dir / "last.pt").exists()


def test_checkpoint_refuses_non_finite(tmp_path):
    with pytest.raises(CheckpointError, match="NaN"):
        checkpoint.save(tmp_path / "x.pt", {"w": torch.tensor([1.0, float("nan")])})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("write", "needle"),
    [
        (lambda p: p.write_bytes(b"\x00garbage"), "not a readable diffenc checkpoint"),
        (lambda p: torch.save({"a": torch.zeros(1)}, p), "not a diffenc checkpoint"),
        (lambda p: p.write_bytes(b""), "not a readable diffenc checkpoint"),
    ],
)
def test_corrupt_or_foreign_checkpoint(prepared, tmp_path, write, needle):
    cfg = _cfg(prepared, tmp_path)
    run = trainer.train(cfg, progress=False)
    write(run.checkpoint_dir / "last.pt")
    with pytest.raises(CheckpointError, match=needle):
        trainer.train(cfg, "resume", progress=False)


def test_checkpoint_of_another_method(prepared, tmp_path):
    trainer.train(_cfg(prepared, tmp_path, "train.method=vae", "train.run=x"), progress=False)
    with pytest.raises(ConfigError, match="train.method: vae → diffusion"):
        trainer.train(_cfg(prepared, tmp_path, "train.run=x"), "resume", progress=False)


def test_time_budget_stops_early(prepared, tmp_path):
    run = trainer.train(_cfg(prepared, tmp_path, "train.steps=100000", "train.time_budget_s=0.5"), progress=False)
    status = run.status()
    assert status["state"] == "done" and status["steps"] < 100000


def test_stop_training_from_a_callback(prepared, tmp_path):
    def prune(step, val):
        raise trainer.StopTraining(f"pruned at step {step}")

    with pytest.raises(trainer.StopTraining):
        trainer.train(_cfg(prepared, tmp_path), progress=False, on_validate=prune)
    status = runs.open_run(tmp_path / "runs" / "diffusion").status()
    assert status["state"] == "stopped" and "pruned" in status["reason"]


def test_batches_are_a_function_of_seed_and_step():
    a = trainer.batch_indices(0, 7, 100, 32)
    assert torch.equal(a, trainer.batch_indices(0, 7, 100, 32))
    epoch = torch.cat([trainer.batch_indices(0, s, 96, 32) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(96))


def test_cli_reports_bad_checkpoint_without_traceback(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path)
    run = trainer.train(cfg, progress=False)
    (run.checkpoint_dir / "last.pt").write_bytes(b"junk")
    args = [sys.executable, "-m", "flows.cli", "train", "--resume", "--no-progress"]
    for s in tiny(f"data.root={prepared}", f"train.runs_dir={tmp_path / 'runs'}"):
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "DIFFENC_PREFECT": "0"})
    assert res.returncode == 2
    assert "not a readable diffenc checkpoint" in res.stderr and "Traceback" not in res.stderr
    assert json.loads((run.path / runs.STATUS).read_text())["state"] == "done", "a refused resume writes nothing"


def test_progress_is_logged_whole_and_only_when_asked(prepared, tmp_path, caplog):
    """Progress is one log record per log step with its loss fields (no terminal output from the library:
    the fronts render the records); without ``progress`` nothing is logged."""
    with caplog.at_level(logging.INFO, logger="diffenc_core.trainer"):
        trainer.train(_cfg(prepared, tmp_path, "train.method=vae", "train.run=quiet"), progress=False)
        assert not caplog.records
        trainer.train(_cfg(prepared, tmp_path, "train.method=vae"), progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and "20/20" in lines[-1] and "val_neg_elbo=" in lines[-1] and "loss_vae=" in lines[-1], lines


def test_data_prepared_with_other_settings_is_refused_before_the_run_starts(prepared, tmp_path):
    """Prepared intensities are not what a binarised run asks for: one line naming the key, nothing written."""
    with pytest.raises(DataError, match=r"prepared with other data settings \(data.binarize differ\)"):
        trainer.train(_cfg(prepared, tmp_path, "data.binarize=dynamic"))
    assert not (tmp_path / "runs" / "diffusion").exists()


def test_a_bernoulli_run_on_dynamically_binarised_digits(tmp_path):
    """MNIST's convention end to end on digits: binary validation data, a Bernoulli decoder, nats per image."""
    root = tmp_path / "data"
    data.prepare(config.load(None, [f"data.root={root}", "data.binarize=dynamic"]).data)
    cfg = config.load(None, tiny(f"data.root={root}", f"train.runs_dir={tmp_path / 'runs'}", "data.binarize=dynamic"))
    assert cfg.likelihood == "bernoulli"
    run = trainer.train(cfg)
    hist = run.history()
    val = hist["val_neg_elbo"].dropna()
    assert "sigma_x" not in hist and len(val) == 2
    assert (val > 0).all(), "a Bernoulli -ELBO of binary pixels is positive nats"
    assert checkpoint.load(run.checkpoint_dir / "last.pt")["models"]["decoder.net.0.weight"].shape[1] == 4
