"""The training loop: run directory, bit-identical resume after a kill, failures, bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import tiny

from diffenc_core import checkpoint, config, data, runs, trainer
from diffenc_core.errors import CheckpointError, DivergenceError


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


def test_resume_after_sigkill_is_bit_identical(prepared, tmp_path):
    sets = ["train.steps=60", "train.checkpoint_every=5", "train.log_every=5", "train.val_every=30"]
    straight = trainer.train(_cfg(prepared, tmp_path / "a", *sets), progress=False)

    cfg_b = _cfg(prepared, tmp_path / "b", *sets)
    args = [sys.executable, "-m", "flows.cli", "train", "--no-progress"]
    for s in tiny(f"data.root={prepared}", f"train.runs_dir={tmp_path / 'b' / 'runs'}", *sets):
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFENC_PREFECT": "0"}
    proc = subprocess.Popen(args, env=env, start_new_session=True)
    last = tmp_path / "b" / "runs" / "diffusion" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if last.exists() and checkpoint.load(last)["step"] >= 15:
            break
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load(last)["step"]
    assert 15 <= killed_at < 60
    assert runs.Run(last.parents[1]).status()["state"] == "running", "a killed run is left running"

    resumed = trainer.train(cfg_b, resume=True, progress=False)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    ha, hb = straight.history(), resumed.history()
    assert list(ha["step"]) == list(hb["step"])
    assert ha["recon_nll"].tolist() == hb["recon_nll"].tolist()


def test_fresh_run_clears_the_old_one(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path)
    run = trainer.train(cfg, progress=False)
    (run.path / runs.METRICS).write_text("{}")
    trainer.train(cfg, progress=False)
    assert not (run.path / runs.METRICS).exists()


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
        trainer.train(cfg, resume=True, progress=False)


def test_checkpoint_of_another_method(prepared, tmp_path):
    trainer.train(_cfg(prepared, tmp_path, "train.method=vae", "train.run=x"), progress=False)
    with pytest.raises(CheckpointError, match="holds a 'vae' run"):
        trainer.train(_cfg(prepared, tmp_path, "train.run=x"), resume=True, progress=False)


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
