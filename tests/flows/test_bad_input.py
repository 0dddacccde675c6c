"""The bad-input matrix (issue 19): each mistake a new user makes, tried through the real CLI, ends in
exactly one line on stderr, the expected exit status (2: a user mistake), no traceback, and leaves every
file and folder of the existing runs and of the prepared data as it was (checksums before and after).

Warnings count as lines (in a real process they print on stderr). A row is ``args`` (after the
command's own words; ``{root}``, ``{runs}``, ``{files}`` are filled in) and a fragment of the one line.
Rows marked ``BARE`` get no tiny-profile ``--set`` values (``tune resume`` takes none; a params file's
own values are the point). The files the rows need (runs with broken checkpoints, params files in odd
encodings, bad data files) are made once, by the module's fixture, before any checksum is taken.
Prefect's ``overrides`` share the configuration path: the last table feeds them to the flows' resolver.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny
from typer.testing import CliRunner

from diffenc_core import config, data, runs, runstart, trainer
from diffenc_core.errors import ConfigError
from flows.cli import app

BARE = "bare"  # a row whose command takes no --set
PWNED = "pwned"  # the file a malicious checkpoint would create if it were unpickled


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (its checksum) and folder (and link) under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link to {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "folder"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Evil:
    """Unpickling this runs a command: a checkpoint built to attack whoever loads it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _copy_run(src: Path, dst: Path, status: dict | None = None) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(runs.METRICS, runs.RECON, runs.PLOTS, runs.LIVE))
    if status is not None:
        runs.atomic_write_json(dst / runs.STATUS, status)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/ (prepared digits and a prepared file dataset), runs/ (a finished VAE run with its evaluation,
    runs with broken checkpoints, links, a study and a notes folder) and files/ (bad params and data files)."""
    root = tmp_path_factory.mktemp("bad-input")
    files, runs_dir = root / "files", root / "runs"
    files.mkdir()
    cfg = config.load(None, tiny(f"data.root={root / 'data'}", f"train.runs_dir={runs_dir}", "train.method=vae"))
    data.prepare(cfg.data)
    rng = np.random.default_rng(0)
    np.savez(files / "good.npz", x=rng.random((60, 16), dtype=np.float32))
    data.prepare(config.load(None, [f"data.root={root / 'data'}", "data.dataset=file",
                                    f"data.path={files / 'good.npz'}"]).data)
    vae = trainer.train(cfg, progress=False)
    vae.write_metrics({"rate_nats": 1.0, "method": "vae"})
    (vae.path / runs.LIVE).mkdir()
    (vae.path / runs.LIVE / "metrics.json").write_text("{}")
    (vae.plots_dir / "latents.png").write_bytes(b"png")
    last = (vae.checkpoint_dir / "last.pt").read_bytes()
    status = {**vae.status(), runstart.CHECKPOINT_STEP: 20}
    old_status = {k: v for k, v in status.items() if k != runstart.CHECKPOINT_STEP}

    def broken(name: str, body: bytes, recorded: bool = True) -> None:
        run = _copy_run(vae.path, runs_dir / name, status if recorded else old_status)
        for ckpt in run.joinpath(runs.CHECKPOINTS).iterdir():
            ckpt.write_bytes(body)

    broken("corrupt", os.urandom(4096))
    broken("corrupt-old", os.urandom(4096), recorded=False)  # no step in status.json: the start reads it
    broken("truncated", last[: len(last) // 2])
    broken("legacy", pickle.dumps({"format": "diffenc-checkpoint", "version": 1, "step": 20}))
    broken("evil", pickle.dumps(Evil(root / PWNED)))
    foreign = runs_dir / "foreign-ckpt.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    broken("foreign", foreign.read_bytes())
    torch.save({"format": "diffenc-checkpoint", "version": 99, "step": 20}, foreign)
    broken("future", foreign.read_bytes())
    foreign.unlink()
    other = _copy_run(vae.path, runs_dir / "other-method", status)
    config.dump(config.load(other / runs.PARAMS, ["train.method=diffusion", "train.run=other-method"]),
                other / runs.PARAMS)
    nockpt = _copy_run(vae.path, runs_dir / "no-checkpoint", status)
    shutil.rmtree(nockpt / runs.CHECKPOINTS)
    (runs_dir / "tune" / "study" / "0").mkdir(parents=True)
    (runs_dir / "tune" / "study.db").write_text("optuna")
    (runs_dir / "notes").mkdir()
    (runs_dir / "notes" / "readme.txt").write_text("my notes")
    (root / "outside").mkdir()
    (runs_dir / "link-out").symlink_to(root / "outside")
    (runs_dir / "dangling").symlink_to(root / "nothing-here")
    (root / "afile").write_text("not a folder")
    (root / "empty").mkdir()

    params = {
        "not-utf8.yaml": b"train:\n  beta: 1\n\xff\n",
        "latin1.yaml": "train:\n  run: café\n".encode("latin-1"),
        "utf16.yaml": "train:\n  beta: 1\n".encode("utf-16"),
        "syntax.yaml": b"train:\n  beta: [1, 2\n  steps: 3\n",
        "tabs.yaml": b"train:\n\tbeta: 1\n",
        "nul.yaml": b"train:\n  beta: 1\x00\n",
        "list.yaml": b"- train\n- model\n",
        "scalar.yaml": b"just words\n",
        "section-list.yaml": b"train: [1, 2]\n",
        "unknown.yaml": b"train:\n  betta: 1\n",
        "unknown-section.yaml": b"trian:\n  beta: 1\n",
        "bad-value.yaml": b"train:\n  steps: 0\n",
        "inf.yaml": b"train:\n  beta: .inf\n",
        "null-runs-dir.yaml": b"train:\n  runs_dir: ~\n",
        "int-key.yaml": b"1: 2\n",
        "space.yaml": b"tune:\n  space:\n    em.nothing: {type: float, low: 0, high: 1}\n",
        "checkpoint.yaml": last[:2048],
    }
    for name, body in params.items():
        (files / name).write_bytes(body)
    (files / "folder.yaml").mkdir()
    (files / "x.txt").write_text("1,2,3\n")
    (files / "corrupt.npz").write_bytes(os.urandom(512))
    (files / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(512))
    (files / "empty.npy").write_bytes(b"")
    (files / "no-pngs").mkdir()
    (files / "no-pngs" / "notes.txt").write_text("no images here")
    np.save(files / "strings.npy", np.array([["a", "b"]] * 40))
    np.save(files / "few.npy", np.zeros((3, 4), dtype=np.float32))
    np.save(files / "nan.npy", np.full((40, 4), np.nan, dtype=np.float32))
    return root


RUN_ENDS = "continue it with --resume, replace it with --overwrite"
NAME = "must be one folder name under train.runs_dir"

CONFIG = {  # keys and values of --set: `diffenc config` resolves them like every command does
    "unknown key": (["--set", "train.betta=1"], "--set train.betta: unknown key 'train.betta' (did you mean "),
    "unknown section": (["--set", "foo.bar=1"], "--set foo.bar: unknown key 'foo.bar'"),
    "unknown deep key": (["--set", "model.decoder.hiden=3"], "'model.decoder.hiden' (did you mean 'model.decoder.hid"),
    "a value used as a section": (["--set", "train.beta.x=1"], "--set train.beta.x: 'train.beta' is a value"),
    "no =": (["--set", "train.beta"], "expected key=value"),
    "empty key": (["--set", "=1"], "empty key"),
    "empty part of a key": (["--set", "train..beta=1"], "bad key 'train..beta'"),
    "a section set to a value": (["--set", "train=5"], "--set train: 'train' is a section: set its keys"),
    "int below its bound": (["--set", "model.latent_dim=0"], "--set model.latent_dim: Input should be greater"),
    "int given words": (["--set", "train.steps=many"], "--set train.steps: Input should be a valid integer"),
    "int given a fraction": (["--set", "train.steps=1.5"], "--set train.steps: Input should be a valid integer"),
    "float below its bound": (["--set", "train.beta=-1"], "--set train.beta: Input should be greater than 0"),
    "float given words": (["--set", "train.beta=high"], "--set train.beta: Input should be a valid number"),
    "infinite beta": (["--set", "train.beta=.inf"], "--set train.beta: Input should be a finite number"),
    "NaN beta": (["--set", "train.beta=.nan"], "--set train.beta: Input should be a finite number"),
    "infinite learning rate": (["--set", "train.lr_encoder=.inf"], "--set train.lr_encoder: Input should be a finite"),
    "NaN step size": (["--set", "em.step_size=nan"], "--set em.step_size: Input should be a"),
    "infinite time budget": (["--set", "train.time_budget_s=.inf"], "--set train.time_budget_s: Input should be a fin"),
    "fraction above 1": (["--set", "data.val_fraction=1.5"], "--set data.val_fraction: Input should be less than"),
    "fractions leaving no training": (["--set", "data.val_fraction=0.5", "--set", "data.test_fraction=0.45"],
                                      "val_fraction + test_fraction must leave at least 10%"),
    "unknown dataset": (["--set", "data.dataset=cifar"], "--set data.dataset: Input should be 'digits'"),
    "file dataset without a path": (["--set", "data.dataset=file"], "dataset 'file' needs data.path"),
    "unknown E-step": (["--set", "em.e_step=hmc"], "--set em.e_step: Input should be 'mala', 'ula' or 'smc'"),
    "step size above its maximum": (["--set", "em.step_size=2"], "step_size must not exceed step_size_max"),
    "log-SNR range reversed": (["--set", "model.encoder.logsnr_min=20"], "logsnr_min must be below logsnr_max"),
    "AIS check ladder too long": (["--set", "eval.ais_check_temperatures=500"], "ais_check_temperatures must be below"),
    "device given a YAML boolean": (["--set", "train.device=yes"], "should be 'auto', 'cpu' or 'cuda' (got 'yes')"),
    "bool given words": (["--set", "em.persistent=maybe"], "--set em.persistent: Input should be a valid boolean"),
    "unknown method": (["--set", "train.method=gan"], "--set train.method: Input should be 'diffusion' or 'vae'"),
    "no head to warm-start": (["--set", "train.method=diffusion", "--set", "model.encoder.base=none", "--set",
                               "train.warm_start=vae"],
                              "model.encoder.base 'none' has no Gaussian head, which train.warm_start needs"),
    "posterior std out of range": (["--set", "data.linear_gaussian.posterior_std=[2]"], "must lie in (0, 1)"),
    "shift of one number": (["--set", "data.bimodal.shift=[1]"], "--set data.bimodal.shift: "),
    "empty runs folder": (["--set", "train.runs_dir="], "--set train.runs_dir: must be a non-empty path"),
    "empty data folder": (["--set", "data.root="], "--set data.root: must be a non-empty path"),
    "count too small": (["--set", "data.count=5"], "--set data.count: Input should be greater than or equal to 10"),
    "image too small": (["--set", "data.image_size=7"], "--set data.image_size: Input should be greater"),
    "run up a folder": (["--set", "train.run=../x"], f"--set train.run: {NAME}"),
    "run absolute": (["--set", "train.run=/tmp/x"], f"--set train.run: {NAME}"),
    "run with a slash": (["--set", "train.run=a/b"], f"--set train.run: {NAME}"),
    "run hidden": (["--set", "train.run=.hidden"], f"--set train.run: {NAME}"),
    "run ~ (YAML null)": (["--set", "train.run=~"], f"--set train.run: {NAME}"),
    "run empty": (["--set", "train.run="], f"--set train.run: {NAME}"),
    "run too long": (["--set", "train.run=" + "x" * 300], f"--set train.run: {NAME}"),
    "run with a control character": (["--set", "train.run=a\x01b"], f"--set train.run: {NAME}"),
    "warm start up a folder": (["--set", "train.warm_start=../vae"], f"--set train.warm_start: {NAME}"),
    "search dimension by dotted key": (["--set", "tune.space.em.step_size.low=1"],
                                       "--set tune.space.em.step_size.low: tune.space.em.step_size: 'low' must be"),
    "search dimension of no key": (["--set", "tune.space.em.nothing={type: float, low: 0, high: 1}"],
                                   "tune.space key 'em.nothing' is not a configuration key"),
    "log dimension from 0": (["--set", "tune.space={em.step_size: {type: float, low: 0, high: 1, log: true}}"],
                             "a log-scale dimension needs low > 0"),
    "categorical without choices": (["--set", "tune.space={em.e_step: {type: categorical}}"],
                                    "a categorical dimension needs a non-empty 'choices' list"),
    "processes 0": (["--set", "train.nproc=0"], "--set train.nproc: Input should be greater than or equal to 1"),
    "batch 0": (["--set", "train.batch_size=0"], "--set train.batch_size: Input should be greater"),
    "unparsable list": (["--set", "data.bimodal.shift=[1"], "--set data.bimodal.shift: "),
}

PARAMS = {  # --params FILE: missing, a folder, encodings, YAML errors, shapes, values
    "missing": (["--params", "{files}/missing.yaml"], "{files}/missing.yaml: params file not found"),
    "a folder": (["--params", "{files}/folder.yaml"], "{files}/folder.yaml: is a folder, not a params file"),
    "not UTF-8": (["--params", "{files}/not-utf8.yaml"], "not UTF-8 text (byte 0xff on line 3)"),
    "Latin-1": (["--params", "{files}/latin1.yaml"], "{files}/latin1.yaml: not UTF-8 text (byte 0xe9 on line 2)"),
    "UTF-16": (["--params", "{files}/utf16.yaml"], "{files}/utf16.yaml: not UTF-8 text"),
    "a checkpoint": (["--params", "{files}/checkpoint.yaml"], "{files}/checkpoint.yaml: not "),
    "YAML syntax": (["--params", "{files}/syntax.yaml"], "{files}/syntax.yaml: not valid YAML at line 3, column"),
    "tabs": (["--params", "{files}/tabs.yaml"], "{files}/tabs.yaml: not valid YAML at line 2, column 1"),
    "NUL byte": (["--params", "{files}/nul.yaml"], "{files}/nul.yaml: not valid YAML at offset"),
    "a list": (["--params", "{files}/list.yaml"], "expected a mapping of sections at the top level"),
    "a scalar": (["--params", "{files}/scalar.yaml"], "expected a mapping of sections at the top level"),
    "a section that is a list": (["--params", "{files}/section-list.yaml"], "'train' is a section: set its keys"),
    "unknown key": (["--params", "{files}/unknown.yaml"], "{files}/unknown.yaml: unknown key 'train.betta'"),
    "unknown section": (["--params", "{files}/unknown-section.yaml"], "unknown key 'trian' (did you mean 'train'?)"),
    "bad value": (["--params", "{files}/bad-value.yaml"], "{files}/bad-value.yaml: train.steps: Input should be"),
    "infinite value": (["--params", "{files}/inf.yaml"], "{files}/inf.yaml: train.beta: Input should be a finite"),
    "null folder": (["--params", "{files}/null-runs-dir.yaml"], "train.runs_dir: Input should be a valid string"),
    "a number as key": (["--params", "{files}/int-key.yaml"], "unknown key '1'"),
    "search space of no key": (["--params", "{files}/space.yaml"], "tune.space key 'em.nothing' is not a config"),
}

TRAIN = {  # runs: names, links, resume and overwrite, checkpoints, data, devices
    "existing run": ([], f"{{runs}}/vae already holds a run (done): {RUN_ENDS}"),
    "resume and overwrite": (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    "resume, other settings": (["--resume", "--set", "model.latent_dim=8"], "model.latent_dim: 4 → 8"),
    "resume, other method": (["--resume", "--set", "train.method=diffusion", "--set", "train.run=vae"],
                             "train.method: vae → diffusion"),
    "overwrite a study": (["--overwrite", "--set", "train.run=tune"], "holds files no run writes (study, study.db)"),
    "overwrite notes": (["--overwrite", "--set", "train.run=notes"], "holds files no run writes (readme.txt)"),
    "new run over notes": (["--set", "train.run=notes"], "{runs}/notes already holds a run"),
    "run links out": (["--resume", "--set", "train.run=link-out"], "train.run: {runs}/link-out resolves outside"),
    "overwrite through a link out": (["--overwrite", "--set", "train.run=link-out"], "resolves outside train.runs_dir"),
    "run links to nothing": (["--set", "train.run=dangling"], "train.run: {runs}/dangling is a link to "),
    "warm start links out": (["--set", "train.method=diffusion", "--set", "train.run=w1", "--set",
                              "train.warm_start=link-out"], "train.warm_start: {runs}/link-out resolves outside"),
    "warm start of no run": (["--set", "train.method=diffusion", "--set", "train.run=w2", "--set",
                              "train.warm_start=nothing"], "train.warm_start: {runs}/nothing has no checkpoint"),
    "warm start that does not fit": (["--set", "train.method=diffusion", "--set", "train.run=w3", "--set",
                                      "train.warm_start=vae", "--set", "model.latent_dim=8"], "does not fit this"),
    "resume, finished without checkpoint": (["--resume", "--set", "train.run=no-checkpoint"],
                                            "finished, but has no checkpoints/last.pt"),
    "resume a corrupt checkpoint": (["--resume", "--set", "train.run=corrupt"],
                                    "{runs}/corrupt/checkpoints/last.pt: not a readable diffenc checkpoint"),
    "resume a corrupt checkpoint, step unrecorded": (["--resume", "--set", "train.run=corrupt-old"],
                                                     "corrupt-old/checkpoints/last.pt: not a readable diffenc"),
    "resume a truncated checkpoint": (["--resume", "--set", "train.run=truncated"], "not a readable diffenc"),
    "resume a legacy pickle": (["--resume", "--set", "train.run=legacy"], "legacy/checkpoints/last.pt: not a readable"),
    "resume a malicious pickle": (["--resume", "--set", "train.run=evil"], "evil/checkpoints/last.pt: not a readable"),
    "resume a foreign checkpoint": (["--resume", "--set", "train.run=foreign"], "not a diffenc checkpoint (no "),
    "resume a future checkpoint": (["--resume", "--set", "train.run=future"], "checkpoint format version 99 is not 1"),
    "resume another method's checkpoint": (["--resume", "--set", "train.run=other-method", "--set",
                                            "train.method=diffusion"], "holds a 'vae' run, not 'diffusion'"),
    "runs folder is a file": (["--set", "train.runs_dir={root}/afile"],
                              "cannot write (a file stands where a folder is needed); check train.runs_dir"),
    "data not prepared": (["--set", "data.root={root}/empty", "--set", "train.run=nodata"],
                          "manifest.json: missing — run `diffenc prepare`"),
    "no GPU": (["--set", "train.device=cuda", "--set", "train.run=gpu"],
               "train.device: 'cuda' requested but no CUDA device is available"),
    "processes 0": (["--nproc", "0"], "--set train.nproc: Input should be greater than or equal to 1"),
    "bad --set with a good file": (["--params", "{files}/../files/missing.yaml"], "params file not found"),
}

PREPARE = {  # data paths: nothing prepared is replaced by a bad file
    "data folder is a file": (["--set", "data.root={root}/afile"],
                              "cannot write (a file stands where a folder is needed); check data.root"),
    "missing data file": (["--set", "data.dataset=file", "--set", "data.path={files}/none.npz"],
                          "{files}/none.npz: file not found (data.path)"),
    "unsupported data file": (["--set", "data.dataset=file", "--set", "data.path={files}/x.txt"],
                              "unsupported file type '.txt'"),
    "corrupt .npz": (["--set", "data.dataset=file", "--set", "data.path={files}/corrupt.npz"],
                     "corrupt.npz: not a readable NumPy file"),
    "corrupt .parquet": (["--set", "data.dataset=file", "--set", "data.path={files}/corrupt.parquet"],
                         "corrupt.parquet: not a readable Parquet file"),
    "empty .npy": (["--set", "data.dataset=file", "--set", "data.path={files}/empty.npy"], "empty.npy: not a readable"),
    "text in a .npy": (["--set", "data.dataset=file", "--set", "data.path={files}/strings.npy"], "expected numeric"),
    "too few rows": (["--set", "data.dataset=file", "--set", "data.path={files}/few.npy"], "at least"),
    "NaN rows": (["--set", "data.dataset=file", "--set", "data.path={files}/nan.npy"], "NaN or infinite values"),
    "a folder without PNGs": (["--set", "data.dataset=file", "--set", "data.path={files}/no-pngs"],
                              "found 0 PNG images"),
}

EVALUATE = {
    "no such run": (["--run", "{runs}/nothing"], "{runs}/nothing: not a run directory"),
    "a folder that is no run": (["--run", "{runs}/notes"], "{runs}/notes: not a run directory"),
    "a file": (["--run", "{root}/afile"], "{root}/afile: not a run directory"),
    "no checkpoint": (["--run", "{runs}/no-checkpoint"], "no checkpoints/last.pt"),
    "corrupt checkpoint": (["--run", "{runs}/corrupt"], "{runs}/corrupt/checkpoints/best.pt: not a readable diffenc"),
    "truncated checkpoint": (["--run", "{runs}/truncated"], "not a readable diffenc checkpoint"),
    "legacy pickle": (["--run", "{runs}/legacy"], "not a readable diffenc checkpoint"),
    "malicious pickle": (["--run", "{runs}/evil"], "not a readable diffenc checkpoint"),
    "foreign checkpoint": (["--run", "{runs}/foreign"], "not a diffenc checkpoint"),
    "bad eval value": (["--set", "eval.n_test=0"], "--set eval.n_test: Input should be greater than or equal to 1"),
}

COMPARE = {
    "into a run": (["--run", "{runs}/vae", "--out", "{runs}/vae/cmp"], "--out: {runs}/vae/cmp is inside the run"),
    "a run not evaluated": (["--run", "{runs}/no-checkpoint"], "no-checkpoint: not evaluated"),
    "no such run": (["--run", "{runs}/nothing"], "{runs}/nothing: not a run directory"),
    "nothing evaluated": (["--runs-dir", "{root}/empty"], "{root}/empty: no evaluated runs to compare"),
}

TUNE = {
    "unknown study": (["show", "--study", "nope"], "no tuning storage here yet"),
    "unknown study to resume": ([BARE, "resume", "--study", "nope"], "no tuning storage here yet"),
    "study name with a slash": (["--study", "a/b"], "--study 'a/b': use letters, digits"),
    "no trials": (["--n-trials", "0"], "--n-trials 0: must be at least 1"),
    "no workers": (["--workers", "0"], "--workers 0: must be at least 1"),
    "tuning a key the tuner sets": (["--set", "tune.space={train.steps: {type: int, low: 1, high: 9}}"],
                                    "tune.space['train.steps']: cannot be tuned"),
    "grace within the heartbeat": (["--set", "tune.grace_period=2", "--set", "tune.heartbeat_interval=5"],
                                   "tune.grace_period (2) must exceed tune.heartbeat_interval (5)"),
    "only beta for distortion": (["--set", "tune.objective=distortion", "--set",
                                  "tune.space={train.beta: {type: float, low: 0.5, high: 2}}"],
                                 "only train.beta is declared"),
    "a dimension the config rejects": (["--set", "tune.space={em.step_size: {type: float, low: 0.5, high: 2}}"],
                                       "value 2.0 of this float dimension is not valid here"),
}

MATRIX = {
    **{f"config: {k}": (["config", *a], n) for k, (a, n) in CONFIG.items()},
    **{f"params: {k}": (["config", BARE, *a], n) for k, (a, n) in PARAMS.items()},  # the file's values alone
    **{f"train: {k}": (["train", *a], n) for k, (a, n) in TRAIN.items()},
    **{f"prepare: {k}": (["prepare", *a], n) for k, (a, n) in PREPARE.items()},
    **{f"evaluate: {k}": (["evaluate", *a], n) for k, (a, n) in EVALUATE.items()},
    **{f"compare: {k}": (["compare", *a], n) for k, (a, n) in COMPARE.items()},
    **{f"tune: {k}": (["tune", *a], n) for k, (a, n) in TUNE.items()},
    "params with a bad --set": (["train", "--params", "{files}/unknown-section.yaml", "--set", "train.beta=0"],
                                "unknown key 'trian'"),
}


def fill(world: Path, text: str) -> str:
    for name, path in (("{root}", world), ("{runs}", world / "runs"), ("{files}", world / "files")):
        text = text.replace(name, str(path))
    return text


def argv(world: Path, args: list[str]) -> list[str]:
    """The command line of a row: its command words, the tiny profile (unless BARE), then its own args."""
    args = [fill(world, a) for a in args]
    if BARE in args:
        return [a for a in args if a != BARE]
    words = args[:2] if args[:2] == ["tune", "show"] else args[:1]
    base: list[str] = []
    for s in tiny(f"data.root={world / 'data'}", f"train.runs_dir={world / 'runs'}", "train.method=vae"):
        base += ["--set", s]
    return [*words, *base, *args[len(words):]]


@pytest.mark.parametrize("case", list(MATRIX))
def test_each_mistake_is_one_line_and_changes_nothing(world, case, monkeypatch):
    monkeypatch.setenv("DIFFENC_PREFECT", "0")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(world)  # no params.yaml here: the built-in defaults, then the tiny profile
    args, needle = MATRIX[case]
    needle = fill(world, needle)
    before = snapshot(world)
    with warnings.catch_warnings(record=True) as caught:  # in a real process, each would be more lines on stderr
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, argv(world, args))
    lines = res.stderr.strip().splitlines()
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert snapshot(world) == before, "a refused input changed files"
    assert not (world / PWNED).exists()


def test_the_matrix_covers_the_issue():
    """Issue 19 tried 97 mistakes; every distinct one is a row here."""
    assert len(MATRIX) >= 97


# ------------------------------------------------------------------ Prefect's overrides share the path
OVERRIDES = {
    "unknown key": ({"train.stepz": 1}, {}, "parameters: unknown key 'train.stepz' (did you mean 'train.steps'?)"),
    "unknown nested key": ({"train": {"stepz": 1}}, {}, "parameters: unknown key 'train.stepz'"),
    "bad key": ({"train..beta": 1}, {}, "bad key 'train..beta'"),
    "nested bad value": ({"train": {"beta": -1}}, {}, "parameters: train.beta: Input should be greater than 0"),
    "infinite value": ({"train.beta": float("inf")}, {}, "parameters: train.beta: Input should be a finite number"),
    "run ~": ({"train.run": "~"}, {}, f"parameters: train.run: {NAME}"),
    "run not text": ({"train.run": 5}, {}, "parameters: train.run: Input should be a valid string"),
    "search dimension by dotted key": ({"tune.space.em.step_size.low": 1}, {}, "'low' must be below 'high'"),
    "not a mapping": ([1, 2], {}, "parameters: 'overrides' must be a mapping, got list"),
    "params file not YAML": ({}, {"params_file": "/etc/passwd"}, "is not a YAML params file (.yaml or .yml)"),
    "params file not UTF-8": ({}, {"params_file": "{files}/not-utf8.yaml"}, "not UTF-8 text (byte 0xff on line 3)"),
    "bad served --set": ({}, {"sets": ["train.beta=0"]}, "--set train.beta: Input should be greater than 0"),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_flow_parameters_are_refused_in_one_line(world, case):
    from flows import prefect_flows

    overrides, kwargs, needle = OVERRIDES[case]
    kwargs = {k: fill(world, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ConfigError) as err:
        prefect_flows.resolve_config(overrides, **kwargs)
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)
