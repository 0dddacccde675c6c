"""``diffenc compare``: the side-by-side table and rate–distortion plot over evaluated runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from diffenc_core import config, runs
from diffenc_core.errors import RunError
from flows.cli import app
from flows.compare import CSV, JSON, MD, RD_PNG, compare_entry


def make_run(root: Path, name: str, method: str, beta: float, metrics: dict | None = None,
             state: str = "done") -> runs.Run:
    """A run directory as train + evaluate leave it (no model: only the files compare reads)."""
    cfg = config.load(None, [f"train.method={method}", f"train.beta={beta}", f"train.run={name}"])
    run = runs.create(root, name)
    config.dump(cfg, run.file(runs.PARAMS))
    run.set_status(state, method=method)
    if metrics is not None:
        run.write_metrics({"method": method, "beta": beta, "latent_dim": 8, "n_test": 60,
                           "latent_mean": [0.0] * 8, **metrics})
    return run


def metrics(rate: float, distortion: float, mse: float) -> dict:
    return {"rate_nats": rate, "distortion_nats": distortion, "neg_elbo_nats": rate + distortion,
            "mse_refined": mse, "psnr_refined_db": 10.0, "probe_accuracy": float("nan")}


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "vae", "vae", 1.0, metrics(12.0, 300.0, 0.02))
    make_run(root, "diffusion", "diffusion", 1.0,
             {**metrics(10.0, 290.0, 0.01), "n_ais": 20, "ais_log_px_nats": -280.0, "ais_gap_nats": 3.0})
    make_run(root, "diffusion-b0.5", "diffusion", 0.5, metrics(15.0, 280.0, 0.009))
    make_run(root, "half-done", "vae", 2.0, None, state="failed")
    return root


def test_compare_writes_side_by_side_table_and_plot(runs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    table = compare_entry(config.Config(), runs_dir=runs_dir, out=out, show=False)
    # evaluated runs only, sorted by method then beta; identity columns first
    assert list(table["name"]) == ["diffusion-b0.5", "diffusion", "vae"]
    assert list(table.columns[:5]) == ["name", "method", "dataset", "beta", "latent_dim"]
    assert list(table.columns[5:11]) == ["ais_log_px_nats", "ais_test_x", "ais_gap_nats", "neg_elbo_nats", "rate_nats",
                                         "distortion_nats"]
    assert "latent_mean" not in table.columns and "n_test" not in table.columns  # lists / bookkeeping dropped

    csv = pd.read_csv(out / CSV)
    assert csv["rate_nats"].tolist() == [15.0, 10.0, 12.0]
    records = json.loads((out / JSON).read_text())
    assert records["vae"]["distortion_nats"] == 300.0 and records["diffusion"]["method"] == "diffusion"
    assert "probe_accuracy" not in records["vae"]  # NaN is left out, never written as invalid JSON
    md = (out / MD).read_text()
    assert "| metric | diffusion-b0.5 | diffusion | vae |" in md
    assert "| neg_elbo_nats | 295 * | 300 | 312 |" in md  # the lowest neg-ELBO is marked
    # AIS runs on a subset of the test x: the table says which, beside the estimate
    assert table.columns.get_loc("ais_test_x") == table.columns.get_loc("ais_log_px_nats") + 1
    assert "| ais_test_x | – | 20 of 60 | – |" in md
    assert (out / RD_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same runs give the same bytes (so `dvc status` stays clean after `diffenc compare`)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    compare_entry(config.Config(), runs_dir=runs_dir, out=out, show=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_default_out_is_inside_runs_dir_and_not_taken_for_a_run(runs_dir: Path) -> None:
    cfg = config.load(None, [f"train.runs_dir={runs_dir}"])
    compare_entry(cfg, show=False)
    assert (runs_dir / "comparison" / MD).is_file()
    table = compare_entry(cfg, show=False)  # the comparison folder is not a run
    assert len(table) == 3


def test_explicit_runs(runs_dir: Path, tmp_path: Path) -> None:
    table = compare_entry(config.Config(), out=tmp_path / "o", run_dirs=[runs_dir / "vae", runs_dir / "diffusion"],
                          show=False)
    assert list(table["name"]) == ["diffusion", "vae"]
    with pytest.raises(RunError, match="half-done: not evaluated"):
        compare_entry(config.Config(), out=tmp_path / "o", run_dirs=[runs_dir / "half-done"], show=False)
    with pytest.raises(RunError, match="not a run directory"):
        compare_entry(config.Config(), out=tmp_path / "o", run_dirs=[tmp_path / "nope"], show=False)


def test_no_evaluated_runs_is_a_clear_error(tmp_path: Path) -> None:
    make_run(tmp_path / "runs", "only", "vae", 1.0, None)
    with pytest.raises(RunError, match="no evaluated runs to compare"):
        compare_entry(config.Config(), runs_dir=tmp_path / "runs", show=False)


def test_cli_compare(runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["compare", "--runs-dir", str(runs_dir), "--out", "cmp"])
    assert res.exit_code == 0, res.output
    assert "neg_elbo_nats" in res.output and "skipped (not evaluated; status failed)" in res.output
    assert (tmp_path / "cmp" / CSV).is_file()

    res = runner.invoke(app, ["compare", "--run", str(runs_dir / "vae"), "--run", str(runs_dir / "diffusion"),
                              "--out", "two"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "two" / CSV)) == 2

    res = runner.invoke(app, ["compare", "--runs-dir", str(tmp_path / "empty")])
    assert res.exit_code == 2
    assert "error:" in res.output and "no evaluated runs" in res.output and "Traceback" not in res.output


def test_compare_says_when_metrics_are_older_than_the_checkpoint(runs_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 #7: a run that trained further after its evaluation was compared with stale metrics, no note."""
    import os

    for name, shift in (("vae", -1), ("diffusion", 1)):  # vae: evaluated a second before its last checkpoint
        last = runs_dir / name / runs.CHECKPOINTS / "last.pt"
        last.write_bytes(b"a checkpoint")
        evaluated = last.stat().st_mtime_ns + shift * 10**9
        os.utime(runs_dir / name / runs.METRICS, ns=(evaluated, evaluated))
    monkeypatch.chdir(tmp_path)
    for args in (["--runs-dir", str(runs_dir)], ["--run", str(runs_dir / "vae"), "--run", str(runs_dir / "diffusion")]):
        res = CliRunner().invoke(app, ["compare", *args, "--out", "cmp"])
        assert res.exit_code == 0, res.output
        notes = [line for line in res.stdout.splitlines() if "stale" in line]
        assert notes == [f"{runs_dir / 'vae'}: metrics.json is older than checkpoints/last.pt (trained further "
                         f"since its evaluation); its metrics are stale: run `diffenc evaluate --run "
                         f"{runs_dir / 'vae'}`"], res.stdout
