"""Training with several processes (gloo on CPU): `diffenc train --nproc 2` and plain torchrun, both
methods, bit-identical resume after SIGTERM, resume with another number of processes, N processes
against one on identical inputs and noise, a rank that dies, a callback that stops the job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import tiny

from diffenc_core import checkpoint, config, data, evaluate, runs, trainer
from flows import entry

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="linux /proc")]

TESTS = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240  # one tiny job on 2 shared cores takes ~10 s
DEATH_NOTICED_S = 30  # a job whose rank died ends within this (no hang until the collective timeout)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFENC_PREFECT": "0"}
GRAD_TOL = 1e-6  # gradients (clipped to norm <= 1) and parameters of 1 vs 2 processes: float summation order
STATE_TOL = 1e-5  # chains after MALA steps from those parameters


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data.prepare(config.load(None, [f"data.root={root}"]).data)
    return root


def _sets(prepared: Path, runs_dir: Path, *extra: str) -> list[str]:
    return tiny(f"data.root={prepared}", f"train.runs_dir={runs_dir}", *extra)


def _args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=LAUNCH_TIMEOUT_S)


def _models(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")["models"]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while time.time() < deadline:
        hist = runs.Run(run_dir).history() if (run_dir / runs.HISTORY).exists() else None
        if hist is not None and len(hist) and hist["step"].max() >= step:
            return
        assert proc.poll() is None, "the job ended before it reached the step"
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {LAUNCH_TIMEOUT_S} s")


def _drawn(cfg: config.Config, n: int, steps: range) -> set[int]:
    return {i for s in steps for i in trainer.batch_indices(cfg.train.seed, s, n, cfg.train.batch_size).tolist()}


def test_n_processes_match_one_process_on_identical_inputs_and_noise(prepared, tmp_path):
    """Both methods, both phases of a diffusion run: per-step gradients, final parameters and the
    replicated E-step state of 2 processes equal one process's on the same global batches."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    script = str(TESTS / "dist_match.py")
    subprocess.run([sys.executable, script, str(prepared), str(one)], check=True, env=ENV, timeout=LAUNCH_TIMEOUT_S)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    script, str(prepared), str(two)], check=True, env=ENV, timeout=LAUNCH_TIMEOUT_S,
                   capture_output=True)
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for method in ("diffusion", "vae"):
        for step, (ga, gb) in enumerate(zip(a[method]["grads"], b[method]["grads"], strict=True)):
            assert ga.keys() == gb.keys() and ga
            for key in ga:
                assert torch.allclose(ga[key], gb[key], atol=GRAD_TOL, rtol=0), f"{method} step {step}: {key}"
        ma, mb = a[method]["models"], b[method]["models"]
        assert ma.keys() == mb.keys()
        for key in ma:
            tol = STATE_TOL if key in ("chains", "log_step") else GRAD_TOL
            if ma[key].dtype == torch.bool:
                assert torch.equal(ma[key], mb[key]), f"{method}: {key}"
            else:
                assert torch.allclose(ma[key], mb[key], atol=tol, rtol=0), f"{method}: {key}"
    assert int(a["diffusion"]["models"]["has_chain"].sum()) > 0, "the EM steps ran"


def test_two_processes_stop_on_sigterm_and_resume_bit_identically(prepared, tmp_path):
    sets = _sets(prepared, tmp_path / "runs", "train.steps=40", "train.checkpoint_every=1000", "train.val_every=20")
    straight = _cli("train", "--nproc", "2", "--no-progress", *_args([*sets, "train.run=straight"]))
    assert straight.returncode == 0, straight.stderr
    run_a = tmp_path / "runs" / "straight"
    status = runs.Run(run_a).status()
    assert status["state"] == "done" and status["processes"] == 2
    assert list(runs.Run(run_a).history()["step"]) == [5, 10, 15, 20, 25, 30, 35, 40], "history written once"
    state = checkpoint.load(run_a / "checkpoints" / "last.pt")
    cfg = config.load(None, [*sets, "train.run=straight"])
    n = data.read_manifest(cfg.data.prepared_dir)["sizes"]["train"]
    assert state["processes"] == 2 and len(state["rng_ranks"]) == 2
    assert state["models"]["chains"].shape[0] == n, "the checkpoint holds every example's chain"
    assert set(state["models"]["has_chain"].nonzero().squeeze(-1).tolist()) == _drawn(cfg, n, range(40))
    method, _ = evaluate.load_method(runs.Run(run_a), cfg)  # evaluation reads it like any checkpoint
    assert method.chains.shape[0] == n

    run_b = tmp_path / "runs" / "b"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--nproc", "2", "--no-progress",
                             *_args([*sets, "train.run=b"])], env=ENV, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(proc, run_b, 10)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    status = runs.Run(run_b).status()
    stopped_at = checkpoint.load(run_b / "checkpoints" / "last.pt")["step"]
    assert proc.returncode == 143, stderr
    assert stderr.count("\n") == 1 and "SIGTERM at step" in stderr, stderr
    assert status["state"] == "interrupted" and status["steps"] == stopped_at and 10 <= stopped_at < 40

    resumed = _cli("train", "--nproc", "2", "--no-progress", "--resume", *_args([*sets, "train.run=b"]))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming b from step {stopped_at}" in resumed.stdout
    a, b = _models(run_a), _models(run_b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after the resume"
    ha, hb = runs.Run(run_a).history(), runs.Run(run_b).history()
    assert ha["recon_nll"].tolist() == hb["recon_nll"].tolist()


def test_the_vae_through_plain_torchrun(prepared, tmp_path):
    sets = _sets(prepared, tmp_path / "runs", "train.method=vae")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "flows.cli", "train", "--no-progress", *_args(sets)],
                         capture_output=True, text=True, env=ENV, timeout=LAUNCH_TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("trained") == 1, "rank 0 alone reports"
    run = runs.Run(tmp_path / "runs" / "vae")
    assert run.status()["state"] == "done" and run.status()["processes"] == 2
    assert list(run.history()["step"]) == [5, 10, 15, 20]


def test_resume_with_another_number_of_processes_keeps_every_chain(prepared, tmp_path):
    """1 process → 2 → 1: documented as correct, not bit-identical (the random streams restart): the
    model, optimisers and each example's chain carry over; examples not drawn since keep theirs."""
    runs_dir = tmp_path / "runs"
    sets = _sets(prepared, runs_dir, "train.lr_schedule=constant", "train.checkpoint_every=1000")
    cfg = config.load(None, [*sets, "train.steps=10"])
    run_dir = trainer.train(cfg, progress=False).path
    n = data.read_manifest(cfg.data.prepared_dir)["sizes"]["train"]
    legs = [(10, 16, "two"), (16, 22, "one")]
    for begin, end, how in legs:
        before = _models(run_dir)
        if how == "two":
            res = _cli("train", "--nproc", "2", "--no-progress", "--resume", *_args([*sets, f"train.steps={end}"]))
            assert res.returncode == 0, res.stderr
        else:
            trainer.train(config.load(None, [*sets, f"train.steps={end}"]), "resume", progress=False)
        after = _models(run_dir)
        status = runs.Run(run_dir).status()
        assert status["state"] == "done" and status["resumed_from"] == begin
        assert status["processes"] == (2 if how == "two" else 1)
        drawn = _drawn(cfg, n, range(begin, end))
        kept = torch.tensor([i not in drawn for i in range(n)])
        for key in ("chains", "log_step", "has_chain"):
            assert torch.equal(after[key][kept], before[key][kept]), f"{how}: {key} of examples not drawn"
        assert bool(after["has_chain"][sorted(drawn)].all())
        assert not torch.equal(after["chains"], before["chains"]), "the drawn examples moved on"


def test_a_killed_rank_ends_the_job_with_one_message(prepared, tmp_path):
    run_dir = tmp_path / "runs" / "diffusion"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--nproc", "2", "--no-progress",
                             *_args(_sets(prepared, tmp_path / "runs", "train.steps=100000"))],
                            env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(proc, run_dir, 5)
        ranks = {}
        for child in Path(f"/proc/{proc.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                ranks.update({int(e.split(b"=")[1]): int(pid) for e in env if e.startswith(b"RANK=")})
        killed_at = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert time.time() - killed_at < DEATH_NOTICED_S
    assert proc.returncode == 1
    assert stderr.splitlines() == [f"error: rank 1 (pid {ranks[1]}) was killed by SIGKILL"], stderr
    status = runs.Run(run_dir).status()
    assert status["state"] == "failed" and "lost another process" in status["error"]
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values()), "no rank is left running"


def test_a_callback_stops_a_run_of_several_processes(prepared, tmp_path):
    """What a tuning trial does: on_log / on_validate see rank 0's rows; a pruner's StopTraining stops
    every rank (status 'stopped'), and the entry point raises it."""
    cfg = config.load(None, _sets(prepared, tmp_path / "runs", "train.nproc=2", "train.steps=5000",
                                  "train.val_every=10", "train.checkpoint_every=1000"))
    logged, validated = [], []

    def prune(step: int, val: dict[str, float]) -> None:
        validated.append((step, val))
        raise trainer.StopTraining(f"pruned at step {step}")

    with pytest.raises(trainer.StopTraining, match="pruned at step 10"):
        entry.train_entry(cfg, progress=False, on_log=lambda s, row: logged.append(s), on_validate=prune)
    status = runs.Run(tmp_path / "runs" / "diffusion").status()
    assert status["state"] == "stopped" and status["reason"] == "pruned at step 10"
    assert 10 <= status["steps"] < 5000 and logged[:2] == [5, 10]
    assert validated[0][0] == 10 and set(validated[0][1]) == {"val_neg_elbo", "val_rate", "val_distortion", "val_mse"}


def test_a_stop_request_one_rank_saw_keeps_its_reason(prepared, tmp_path):
    """The stop code is agreed by every rank, and so is the reason: rank 0 writes it though rank 1 read it."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(TESTS / "dist_stop.py"), str(prepared), str(tmp_path / "runs")],
                         capture_output=True, text=True, env=ENV, timeout=LAUNCH_TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == ["rank 0: pruned by rank 1", "rank 1: pruned by rank 1"]
    status = runs.Run(tmp_path / "runs" / "vae").status()
    assert (status["state"], status["reason"], status["steps"]) == ("stopped", "pruned by rank 1", 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_nodes(sets: list[str], *flags: str) -> list[subprocess.CompletedProcess]:
    """The README's several-machines command, as two torchrun launchers of one process each on this machine,
    meeting through a c10d rendezvous on 127.0.0.1."""
    port, run_id = _free_port(), f"test-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
           "-m", "flows.cli", "train", "--no-progress", *flags, *_args(sets)]
    nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outs = [node.communicate(timeout=LAUNCH_TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    return [subprocess.CompletedProcess(cmd, n.returncode, o, e) for n, (o, e) in zip(nodes, outs, strict=True)]


def test_two_nodes_train_checkpoint_and_resume_one_run(prepared, tmp_path):
    """Two launchers (`torchrun --nnodes 2`, c10d rendezvous) train 20 steps and resume to 40: the same run,
    tensor for tensor, as two processes of one `diffenc train --nproc 2` trained straight to 40 (a constant
    learning rate: a cosine spans train.steps, which the resume changes)."""
    sets = _sets(prepared, tmp_path / "runs", "train.checkpoint_every=1000", "em.vae_steps=5",
                 "train.lr_schedule=constant")
    for flags, steps in (((), 20), (("--resume",), 40)):
        done = _two_nodes([*sets, f"train.steps={steps}", "train.run=nodes"], *flags)
        assert all(r.returncode == 0 for r in done), [r.stderr for r in done]
        assert sum(r.stdout.count("trained") for r in done) == 1, "global rank 0 alone reports"
    status = runs.Run(tmp_path / "runs" / "nodes").status()
    assert status["state"] == "done" and status["processes"] == 2 and status["resumed_from"] == 25
    straight = _cli("train", "--nproc", "2", "--no-progress", *_args([*sets, "train.steps=40", "train.run=straight"]))
    assert straight.returncode == 0, straight.stderr
    a, b = _models(tmp_path / "runs" / "straight"), _models(tmp_path / "runs" / "nodes")
    assert all(torch.equal(a[key], b[key]) for key in a), "a resumed two-node run is the straight run"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_command_trains_on_gpus(prepared, tmp_path):
    """One GPU per rank (NCCL for the gradients) with two GPUs, else one GPU in one process."""
    nproc = min(2, torch.cuda.device_count())
    res = _cli("train", "--nproc", str(nproc), "--no-progress",
               *_args(_sets(prepared, tmp_path / "runs", "train.device=cuda")))
    assert res.returncode == 0, res.stderr
    state = checkpoint.load(tmp_path / "runs" / "diffusion" / "checkpoints" / "last.pt")
    assert state["processes"] == nproc and bool(state["models"]["has_chain"].any())
