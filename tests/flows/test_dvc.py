"""The DVC pipeline: the real ``dvc repro`` in a temporary copy of the repository (tiny profile).

One copy is built per module (git-tracked and untracked-but-not-ignored files, ``.dvc/config``,
a fresh git repo with one commit, params.yaml = the defaults + ``tests/tiny.py``) and the tests
run against it in order: full run, no-op rerun, evaluation-only rerun, a failing stage,
push/pull to a local remote, an experiment with ``-S train.beta=0.5``, a queued beta sweep.
Static checks of ``dvc.yaml`` against the code need no DVC run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mnist_files import write_raw
from tiny import TINY_SETS

from diffenc_core import config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"
METHODS = ["diffusion", "vae"]
STAGES = ["prepare", "train@diffusion", "train@vae", "evaluate@diffusion", "evaluate@vae", "compare"]

needs_dvc = pytest.mark.skipif(not DVC.exists() or shutil.which("git") is None, reason="needs dvc and git")


# ------------------------------------------------------------------------------ static checks
def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


# config.py / errors.py: parameters are tracked through `params:`, messages do not change results;
# runstart.py / interrupt.py: how a run starts and stops (new, resume, overwrite, a signal), not what it computes
NOT_DEPS = {"config", "errors", "runstart", "interrupt", "__init__"}


def core_imports(module: str) -> set[str]:
    """``diffenc_core`` modules ``module`` imports, transitively (lazy imports included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in NOT_DEPS:
            continue
        tree = ast.parse((REPO / "diffenc_core" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "diffenc_core":
                    todo += [a.name for a in node.names if (REPO / "diffenc_core" / f"{a.name}.py").exists()]
                elif node.module.startswith("diffenc_core."):
                    todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("diffenc_core.")]
    return seen


@pytest.mark.parametrize(("stage", "entry"), [("prepare", "data"), ("train", "trainer"), ("evaluate", "evaluate")])
def test_code_deps_cover_the_modules_each_stage_imports(stage: str, entry: str) -> None:
    spec = dvc_yaml()["stages"][stage]
    deps = spec.get("do", spec)["deps"]
    listed = {Path(d).stem for d in deps if d.startswith("diffenc_core/")}
    needed = core_imports(entry) - NOT_DEPS
    assert needed <= listed, f"dvc.yaml stage '{stage}' lacks code deps: {sorted(needed - listed)}"
    assert all((REPO / d).exists() for d in deps if d.startswith("diffenc_core/"))


def test_every_config_section_a_stage_uses_is_declared() -> None:
    stages = dvc_yaml()["stages"]
    declared = {name: set(spec.get("do", spec).get("params", [])) for name, spec in stages.items()}
    assert declared["prepare"] == {"data"}
    assert declared["train"] == {"model", "train", "em"}
    assert declared["evaluate"] == {"eval"}  # the model comes from the checkpoint, eval from params
    sections = set(config.Config().to_dict()) - {"tune"}
    assert set().union(*declared.values()) == sections
    assert stages["train"]["foreach"] == stages["evaluate"]["foreach"] == METHODS


def test_prepare_depends_on_the_raw_files_and_the_folder_is_in_git() -> None:
    """The raw files (MNIST's) are the prepare stage's dependency; a committed README keeps the folder in
    every clone, so `dvc repro` finds the dependency for datasets that need no raw files."""
    assert "${data.raw_dir}" in dvc_yaml()["stages"]["prepare"]["deps"]
    raw = config.Config().data.raw_dir

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=REPO, env=env()).returncode == 0

    assert (REPO / raw / "README.md").is_file() and not ignored(f"{raw}/README.md")
    assert ignored(f"{raw}/MNIST/raw/train-images-idx3-ubyte")  # the files themselves never go to git
    assert not ignored(f"{raw}/MNIST.dvc")  # ... but `dvc add data/raw/MNIST` can be committed
    assert ignored("data/prepared/digits/manifest.json")


def test_live_logger_writes_dvclive_files_and_no_dvc_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.dvclive_log import LiveLogger

    monkeypatch.chdir(tmp_path)
    with LiveLogger(tmp_path / "live") as log:
        log(5, {"step": 5, "epoch": 0.1, "loss_vae": 3.0, "time_s": 0.5})
        log(10, {"step": 10, "epoch": 0.2, "loss_vae": 2.0, "val_neg_elbo": 9.0, "time_s": 1.0,
                 "bad": float("nan")})
    tsv = (tmp_path / "live" / "plots" / "metrics" / "loss_vae.tsv").read_text().split()
    assert tsv == ["step", "loss_vae", "5", "3.0", "10", "2.0"]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["val_neg_elbo"] == 9.0
    assert not (tmp_path / "live" / "plots" / "metrics" / "epoch.tsv").exists()
    assert not list(tmp_path.rglob("dvc.yaml")) and not (tmp_path / ".dvc").exists()


# --------------------------------------------------------------------------- the real pipeline
def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "PREFECT_API", "DVC_"))}
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", OMP_NUM_THREADS="1", DIFFENC_PREFECT="0",
             DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    e.pop("PYTHONPATH", None)
    return e


def sh(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    if ok and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def dvc(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    return sh(cwd, str(DVC), *args, ok=ok)


def ran(res: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", res.stdout + res.stderr)


def set_param(repo: Path, key: str, value: object) -> None:
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    (repo / "params.yaml").write_text(config.to_yaml(tree))


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository, tiny params, committed, with a local remote, after `dvc repro`."""
    dest = tmp_path_factory.mktemp("dvc") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, env=env(),
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    assert (dest / ".dvc" / "config").is_file() and (dest / "dvc.yaml").is_file()
    config.dump(config.load(dest / "params.yaml", TINY_SETS), dest / "params.yaml")
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "config", "user.email", "test@example.com")
    sh(dest, "git", "config", "user.name", "test")
    sh(dest, "git", "config", "commit.gpgsign", "false")
    # the committed remote is a folder beside the repository; keep this one inside the test's tmp
    (dest / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {dest.parent / 'storage'}\n")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "copy")
    res = dvc(dest, "repro")
    assert ran(res) == STAGES, res.stdout
    sh(dest, "git", "add", "dvc.lock")
    sh(dest, "git", "commit", "-qm", "first run")
    return dest


@needs_dvc
def test_repro_writes_runs_metrics_plots_and_comparison(repo: Path) -> None:
    for m in METHODS:
        run = repo / "runs" / m
        for rel in ("checkpoints/last.pt", "checkpoints/best.pt", "history.parquet", "params.yaml", "status.json",
                    "live/metrics.json", "live/plots/metrics/val_neg_elbo.tsv", "metrics.json", "recon.parquet",
                    "latents.parquet", "posterior.parquet", "plots/reconstructions.png", "plots/latents.png",
                    "plots/training.png"):
            assert (run / rel).is_file(), f"{m}: {rel} missing"
        assert json.loads((run / "status.json").read_text())["state"] == "done"
        assert yaml.safe_load((run / "params.yaml").read_text())["train"]["method"] == m
        assert json.loads((run / "metrics.json").read_text())["method"] == m
        assert pd.read_parquet(run / "posterior.parquet").empty  # digits: no exact posterior to compare
    assert (repo / "data" / "prepared" / "digits" / "manifest.json").is_file()
    table = (repo / "runs" / "comparison" / "comparison.md").read_text()
    assert "| metric | diffusion | vae |" in table
    assert not (repo / "runs" / ".gitignore").exists()  # runs/ and data/ are ignored by the root .gitignore

    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]  # the workspace
    for m in METHODS:
        assert files[f"runs/{m}/metrics.json"]["data"]["rate_nats"] > 0
    out = repo.parent / "plots"
    dvc(repo, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    for needle in ("val_neg_elbo", "validation negative ELBO", "rate\\u2013distortion", "loss_encoder", "loss_vae"):
        assert needle in html, needle
    assert len(list((out / "static").glob("*.png"))) == 7  # 3 per method + the rate–distortion plot


@needs_dvc
def test_nothing_changed_nothing_runs(repo: Path) -> None:
    assert "up to date" in dvc(repo, "status").stdout
    res = dvc(repo, "repro")
    assert ran(res) == []


@needs_dvc
def test_eval_only_change_reruns_only_evaluation(repo: Path) -> None:
    set_param(repo, "eval.refine_steps", 2)
    diff = dvc(repo, "params", "diff", "--json").stdout
    changed = json.loads(diff)["params.yaml"]
    assert list(changed) == ["eval.refine_steps"]
    assert (changed["eval.refine_steps"]["old"], changed["eval.refine_steps"]["new"]) == (3, 2)
    before = lock(repo)["stages"]["train@vae"]
    res = dvc(repo, "repro")
    assert ran(res) == ["evaluate@diffusion", "evaluate@vae", "compare"]
    assert lock(repo)["stages"]["train@vae"] == before
    assert json.loads((repo / "runs" / "vae" / "metrics.json").read_text())["refine_steps"] == 2
    mdiff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    assert mdiff["runs/vae/metrics.json"]["refine_steps"]["new"] == 2
    sh(repo, "git", "commit", "-qam", "eval change")


@needs_dvc
def test_failing_stage_exits_nonzero_and_is_not_taken_for_valid(repo: Path) -> None:
    set_param(repo, "train.steps", 0)
    res = dvc(repo, "repro", ok=False)
    assert res.returncode != 0
    msg = res.stdout + res.stderr
    assert "train.steps: Input should be greater than or equal to 1 (got 0)" in msg
    assert "Traceback" not in msg
    status = dvc(repo, "status", "--json").stdout
    changed = json.loads(status)
    assert "train@diffusion" in changed and "evaluate@diffusion" in changed
    # the lock still describes the last good run; restoring params + data makes it valid again
    sh(repo, "git", "checkout", "-q", "params.yaml")
    dvc(repo, "checkout")
    assert "up to date" in dvc(repo, "status").stdout


@needs_dvc
def test_corrupt_output_is_never_taken_for_valid(repo: Path) -> None:
    (repo / "runs" / "vae" / "checkpoints" / "last.pt").write_bytes(b"truncated")
    changed = json.loads(dvc(repo, "status", "--json").stdout)
    outs = {k: v for entry in changed["train@vae"] for k, v in entry.get("changed outs", {}).items()}
    assert outs == {"runs/vae/checkpoints": "modified"}
    assert "evaluate@vae" in changed  # its input changed too: `dvc repro` retrains, then re-evaluates
    dvc(repo, "checkout", "--force", "train@vae")
    assert "up to date" in dvc(repo, "status").stdout


@needs_dvc
def test_push_and_pull_through_the_local_remote(repo: Path) -> None:
    dvc(repo, "push")
    shutil.rmtree(repo / "runs")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull")
    for m in METHODS:
        assert (repo / "runs" / m / "checkpoints" / "last.pt").is_file()
        assert (repo / "runs" / m / "metrics.json").is_file()
    assert "up to date" in dvc(repo, "status").stdout


@needs_dvc
def test_experiment_with_beta(repo: Path) -> None:
    # one stage only, to keep the test short: the full `dvc exp run -S train.beta=0.5` reruns
    # train, evaluate and compare for both methods (checked by hand; see the README)
    res = dvc(repo, "exp", "run", "-n", "beta-half", "-S", "train.beta=0.5", "train@vae")
    assert ran(res) == ["train@vae"]
    # DVC rewrote params.yaml with its own YAML writer: only the line that was set changed (issue 12 #10)
    diff = sh(repo, "git", "diff", "-U0", "params.yaml").stdout
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-  beta: 1.0", "+  beta: 0.5"], diff
    assert yaml.safe_load((repo / "runs" / "vae" / "params.yaml").read_text())["train"]["beta"] == 0.5
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = [e for base in shown for e in (base.get("experiments") or [])]
    names = {r["name"]: r for e in exps for r in e.get("revs", [])}
    assert "beta-half" in names, shown
    data = names["beta-half"]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["beta"] == 0.5
    assert data["metrics"]["runs/vae/metrics.json"]["data"]["rate_nats"] > 0  # metrics read from the cache


@needs_dvc
def test_beta_sweep_queues_one_experiment_per_value(repo: Path) -> None:
    dvc(repo, "exp", "run", "--queue", "-S", "train.beta=0.25,2")
    status = dvc(repo, "queue", "status").stdout
    assert status.count("Queued") == 2, status


@needs_dvc
def test_raw_files_are_tracked_as_the_prepare_dependency(repo: Path) -> None:
    """MNIST's files under data/raw: `dvc add`-ed, prepared by `dvc repro prepare`, re-prepared when they change."""
    write_raw(repo / "data" / "raw")
    dvc(repo, "add", "data/raw/MNIST")
    assert "data/raw/MNIST.dvc" in sh(repo, "git", "status", "--porcelain", "data/raw").stdout  # committable
    set_param(repo, "data.dataset", "mnist")
    assert ran(dvc(repo, "repro", "prepare")) == ["prepare"]
    assert json.loads((repo / "data" / "prepared" / "mnist" / "manifest.json").read_text())["sizes"]["test"] == 12
    deps = {d["path"]: d for d in lock(repo)["stages"]["prepare"]["deps"]}
    assert deps["data/raw"]["nfiles"] == 6  # README.md, MNIST.dvc and the four IDX files
    assert "prepare" not in json.loads(dvc(repo, "status", "--json", "prepare").stdout)
    write_raw(repo / "data" / "raw", seed=1)  # other images: the data must be prepared again
    changed = json.loads(dvc(repo, "status", "--json", "prepare").stdout)
    assert {"data/raw": "modified"} in [e.get("changed deps") for e in changed["prepare"]]
    assert ran(dvc(repo, "repro", "prepare")) == ["prepare"]
