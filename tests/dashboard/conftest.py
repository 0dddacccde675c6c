"""A runs folder for the dashboard tests, built once per session from REAL tiny training runs.

    diff_digits/   diffusion encoder on digits (trained + evaluated)
    vae_digits/    the VAE baseline on digits, β = 0.5 (trained + evaluated)
    diff_bimodal/  diffusion encoder on the bimodal toy, d = 2 (has posterior.parquet)
    live/          a copy of diff_digits whose status says "running" (live-refresh path)
    broken/        garbage metrics.json, truncated Parquet files, a corrupt PNG
    half_written/  params.yaml and status "running" only: no history, no metrics
    failed/        status "failed" with an error, part of a history
    weird/         valid files with the wrong shapes: params a list, text in numeric metrics
    tune/demo.db   an Optuna study (SQLite) whose trials point at tune/demo/trial_*/ runs
    tune/journal.log  a second, journal-file storage
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"
sys.path.insert(0, str(REPO / "tests"))

from tiny import tiny  # noqa: E402

REAL = {
    "diff_digits": ["train.method=diffusion"],
    "vae_digits": ["train.method=vae", "train.beta=0.5"],
    "diff_bimodal": ["train.method=diffusion", "data.dataset=bimodal", "model.latent_dim=2", "data.count=500"],
}


def _train_real(root: Path, data_root: Path) -> None:
    from diffenc_core import config, data, evaluate, trainer

    prepared = set()
    for name, extra in REAL.items():
        cfg = config.load(None, tiny(*extra, f"train.run={name}", f"train.runs_dir={root}", f"data.root={data_root}"))
        if cfg.data.dataset not in prepared:
            data.prepare(cfg.data)
            prepared.add(cfg.data.dataset)
        trainer.train(cfg, progress=False)
        evaluate.evaluate(cfg)


def _copy_run(src: Path, dst: Path, with_checkpoints: bool = False) -> None:
    shutil.copytree(src, dst, ignore=None if with_checkpoints else shutil.ignore_patterns("checkpoints"))


def _truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt(root: Path) -> None:
    from diffenc_core import runs

    _copy_run(root / "diff_digits", root / "live")
    status = json.loads((root / "live" / "status.json").read_text())
    status.update(state="running")
    status.pop("finished", None)
    (root / "live" / "status.json").write_text(json.dumps(status))

    _copy_run(root / "diff_digits", root / "broken")
    (root / "broken" / "metrics.json").write_text('{"rate_nats": 1.0, "elbo_n')
    for name in ("history.parquet", "recon.parquet", "latents.parquet"):
        _truncate(root / "broken" / name)
    (root / "broken" / "plots" / "latents.png").write_bytes(b"\x89PNG not really")

    half = runs.create(root, "half_written")
    shutil.copy(root / "diff_digits" / "params.yaml", half.file("params.yaml"))
    half.file("status.json").write_text(json.dumps({"state": "running", "started": "2026-01-01T00:00:00+00:00"}))

    _copy_run(root / "vae_digits", root / "failed")
    for name in ("metrics.json", "recon.parquet", "latents.parquet"):
        (root / "failed" / name).unlink()
    (root / "failed" / "status.json").write_text(json.dumps(
        {"state": "failed", "error": "DivergenceError: step 12: non-finite training loss", "steps": 12}))

    weird = root / "weird"
    weird.mkdir()
    (weird / "params.yaml").write_text("- just\n- a list\n")
    (weird / "status.json").write_text('["not", "an", "object"]')
    (weird / "metrics.json").write_text(json.dumps(
        {"method": "vae", "rate_nats": "lots", "distortion_nats": None, "latent_mean": "nope",
         "latent_var": [1, "x"], "active_units": {"a": 1}}))
    import pandas as pd

    pd.DataFrame({"foo": [1, 2]}).to_parquet(weird / "recon.parquet")
    pd.DataFrame({"index": [0, 1], "z0": ["a", "b"], "label": [1, 2]}).to_parquet(weird / "latents.parquet")
    pd.DataFrame({"step": [1, 2], "loss_vae": ["x", "y"]}).to_parquet(weird / "history.parquet")


def _study(root: Path) -> None:
    """A small Optuna study (SQLite) whose trials record their run directory, like flows/tuning.py."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = root / "tune"
    tune.mkdir()
    study = optuna.create_study(study_name="demo", storage=f"sqlite:///{tune / 'demo.db'}", direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    src = root / "vae_digits"
    for i in range(5):
        trial = study.ask()
        beta = trial.suggest_float("train.beta", 0.25, 4.0, log=True)
        step = trial.suggest_float("em.step_size", 1e-4, 0.1, log=True)
        e_step = trial.suggest_categorical("em.e_step", ["mala", "ula"])
        run_dir = tune / "demo" / f"trial_{i:03d}"
        _copy_run(src, run_dir)
        m = json.loads((run_dir / "metrics.json").read_text())
        m.update(beta=beta, rate_nats=m["rate_nats"] * (1 + 1 / beta),
                 distortion_nats=m["distortion_nats"] * (1 + beta / 8))
        (run_dir / "metrics.json").write_text(json.dumps(m))
        trial.set_user_attr("run_dir", str(run_dir))
        value = m["rate_nats"] + m["distortion_nats"] + (0.5 if e_step == "ula" else 0.0) + step
        for s in (100, 200, 300):
            trial.report(value * (1 + 1 / s), s)
        if i == 3:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    journal = optuna.create_study(study_name="journal_demo",
                                  storage=JournalStorage(JournalFileBackend(str(tune / "journal.log"))))
    journal.optimize(lambda t: (t.suggest_float("x", -1, 1)) ** 2, n_trials=3)


def build(root: Path, data_root: Path) -> Path:
    _train_real(root, data_root)
    _corrupt(root)
    _study(root)
    return root


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("DIFFENC_DASHBOARD_RUNS")  # a folder from `python tests/dashboard/conftest.py DIR`
    if prebuilt:
        return Path(prebuilt) / "runs"
    base = tmp_path_factory.mktemp("dashboard")
    return build(base / "runs", base / "data")


if __name__ == "__main__":  # build a demo folder by hand: python tests/dashboard/conftest.py /tmp/demo
    out = Path(sys.argv[1])
    shutil.rmtree(out, ignore_errors=True)
    print(build(out / "runs", out / "data"))
