"""MNIST, the field's benchmark (issue 17): dynamically binarised MNIST with a Bernoulli decoder and the
literature's 784-200-200-d MLPs (Burda et al. 2015), every row at equal wall-clock, beside published numbers.

Rows, per latent size and seed, each trained for the same ``budget`` seconds (one thread each; two rows
train at a time, one per core):

- **VAE**: the Gaussian VAE for the whole budget, validated and scored at its best checkpoint;
- **diffusion, frozen**: a VAE phase (the VAE's steps in ``vae_share`` of the budget), then EM with the
  decoder frozen for the rest;
- **diffusion, learning decoder**: the same VAE phase, then the paper's EM (``em.m_step``, default ``zstar``);
- **control** of each diffusion row: a Gaussian encoder started from that run's VAE phase
  (``checkpoints/vae_phase.pt``), trained by the ELBO for as long as its EM phase, against its final
  decoder, frozen: how much of a win belongs to the diffusion encoder and how much to the schedule.

Columns: test ELBO (path bound for the diffusion encoder, closed form for a Gaussian), exact-log-q ELBO and
IWAE-k (full profile: on the first 500 of the 1 000 test x, for every row), AIS log p(x) (of each decoder, on
the same test images) with its ladder-stability figure, AIS − ELBO, epochs, training seconds. Each control is
queued as soon as its diffusion row is done. The files: ``--raw DIR`` (torchvision's layout, ``DIR/MNIST/raw/``),
else the development copy beside the project (``../shared/data/mnist/*.gz``), unpacked into the workspace.

    python -m benchmarks.mnist [--quick] [--raw DIR] [--workers 2]
"""

from __future__ import annotations

import gzip
import math
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BASE = ["data.dataset=mnist", "data.binarize=dynamic", f"data.val_fraction={1 / 12}", "model.decoder.hidden=200",
        "model.vae.hidden=200", "train.batch_size=100", "train.threads=1", "train.log_every=500"]
BURDA = [  # Burda, Grosse & Salakhutdinov (2015), Table 1: one stochastic layer, 784-200-200-50, dynamic binarisation
    {"model": "VAE (Burda et al. 2015), k = 1", "log_px_nats": -86.76, "budget": "3 280 epochs, IWAE-5000 log p(x)"},
    {"model": "IWAE (Burda et al. 2015), k = 50", "log_px_nats": -84.78, "budget": "3 280 epochs, IWAE-5000 log p(x)"},
]
# AIS: 400 temperatures x 2 moves x 16 particles on 1 000 test x is ~3 min per decoder at d = 50 and lands
# ~0.13 nats below its converged value; the half-length check ladder says how far (docs/method.md §8), paired on
# the first 250 x (on all 1 000 it was 1.5 min more). The guided encoder's exact log q is ~6.5 ms per draw at
# d = 50 (3.5 min for IWAE-32 on 1 000 x), so the importance bounds of every row use the first 500 test x.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"budget_s": 30, "latents": [(16, [0])], "n_test": 200, "val_every": 500, "vae_share": 0.5,
              "eval": ["eval.ais_temperatures=200", "eval.ais_check_temperatures=100", "eval.ais_max_temperatures=400",
                       "eval.iwae_k=32"]},
    "full": {"budget_s": 320, "latents": [(50, [0, 1]), (16, [0])], "n_test": 1000, "val_every": 2000,
             "vae_share": 0.5, "eval": ["eval.ais_temperatures=400", "eval.ais_check_temperatures=200",
                                        "eval.ais_check_n=250", "eval.ais_max_temperatures=800", "eval.iwae_k=32",
                                        "eval.importance_n=500"]},
}
METRICS = ("elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "iwae_1000_nats", "ais_log_px_nats", "ais_gap_nats",
           "ais_ladder_change_nats", "elbo_base_only_nats", "epochs", "train_seconds")
LONG = 10_000_000  # the step count of a budgeted run: the time budget ends it and paces its cosine
CALIBRATION_S = 15  # seconds of VAE training per worker that time a step


def raw_dir(ws: Workspace, given: str | None) -> Path:
    """torchvision's root for MNIST: ``--raw``, else the development copy unpacked into the workspace."""
    if given:
        return Path(given)
    target = ws.root / "raw" / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if not (target / name).exists():
            with gzip.open(SHARED_MNIST / f"{name}.gz") as src, open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return ws.root / "raw"


# ------------------------------------------------------------------------- one row, in a worker
def train_row(root: str, sets: list[str], eval_sets: list[str]) -> dict[str, Any]:
    """Train one run (afresh) and evaluate it; its metrics with the training time and epochs."""
    import torch

    from diffenc_core import config, data, evaluate, trainer

    torch.set_num_threads(1)
    cfg = config.load(None, [f"data.root={root}/data", f"train.runs_dir={root}/runs", *sets])
    run = trainer.train(cfg, "overwrite")
    status = run.status()
    out = evaluate.evaluate(config.load(None, [f"data.root={root}/data", f"train.runs_dir={root}/runs", *sets,
                                               *eval_sets]), run)
    n = data.read_manifest(cfg.data.prepared_dir)["sizes"]["train"]
    return {**out, "train_seconds": status["elapsed_s"], "train_steps": status["steps"],
            "epochs": status["steps"] * cfg.train.batch_size / n, "run_dir": str(run.path)}


def control_row(root: str, sets: list[str], eval_sets: list[str], diffusion_dir: str) -> dict[str, Any]:
    """A Gaussian encoder from the diffusion run's VAE phase, trained by the ELBO for as long as its EM phase
    against its final decoder (frozen); written as a VAE run and evaluated like one."""
    import torch

    from benchmarks.fixed_decoder import fit_encoder
    from diffenc_core import checkpoint, config, data, evaluate, runs, trainer

    torch.set_num_threads(1)
    source = runs.Run(Path(diffusion_dir))
    phase = checkpoint.load(source.checkpoint_dir / trainer.VAE_PHASE)
    final = checkpoint.load(source.checkpoint_dir / "best.pt")  # the decoder the diffusion row was scored with
    seconds = float(source.status()["elapsed_s"]) - float(phase["elapsed_s"])
    common = [f"data.root={root}/data", f"train.runs_dir={root}/runs", *sets, "train.method=vae",
              f"train.steps={LONG}", f"train.time_budget_s={seconds}", f"train.run=control-{source.path.name}"]
    cfg = config.load(None, common)
    manifest = data.read_manifest(cfg.data.prepared_dir)
    torch.manual_seed(cfg.train.seed)
    method = trainer.build_method(cfg, manifest)
    method.load_state_dict({**{k: v for k, v in phase["models"].items() if k.startswith("encoder.")},
                            **{k: v for k, v in final["models"].items() if k.startswith("decoder.")}})
    method.decoder.requires_grad_(False)
    split = data.load_split(cfg.data.prepared_dir, "train")
    val = data.load_split(cfg.data.prepared_dir, "val").x[:1000]
    fit = fit_encoder(cfg, method, trainer.TrainingSet(split.x, binary=True), val, budget_s=seconds)
    run = runs.create(cfg.train.runs_dir, cfg.train.run_name)
    payload = {"method": "vae", "step": fit["train_steps"], "elapsed_s": fit["train_seconds"], "best": math.inf,
               "rng": checkpoint.rng_state(), "processes": 1, "config": cfg.to_dict(), **method.state()}
    checkpoint.save(run.checkpoint_dir / "last.pt", payload)
    run.set_status("done", steps=fit["train_steps"], elapsed_s=fit["train_seconds"], method="vae")
    out = evaluate.evaluate(config.load(None, [*common, *eval_sets, "eval.ais_n=0", "eval.checkpoint=last"]), run)
    return {**out, "train_seconds": fit["train_seconds"], "train_steps": fit["train_steps"],
            "epochs": fit["train_steps"] * cfg.train.batch_size / len(split), "run_dir": str(run.path)}


def vae_step_seconds(root: str, sets: list[str]) -> float:
    """A VAE step's seconds in a short budgeted run, trained in every worker at once: the rows' own loop (batch
    draws, binarisation) under their own load. A bare step timed on the idle machine was 1.4-1.8x faster, so the
    diffusion rows' VAE phase overran and EM got 54-118 s of its 180."""
    import os

    import torch

    from diffenc_core import config, trainer

    torch.set_num_threads(1)
    cfg = config.load(None, [f"data.root={root}/data", f"train.runs_dir={root}/runs", *sets, "train.method=vae",
                             f"train.steps={LONG}", f"train.time_budget_s={CALIBRATION_S}",
                             f"train.run=calibration-{os.getpid()}"])
    run = trainer.train(cfg, "overwrite")
    status = run.status()
    shutil.rmtree(run.path)
    return float(status["elapsed_s"]) / int(status["steps"])


# ------------------------------------------------------------------------------------- plan
def rows_for(p: dict[str, Any], d: int, seed: int, m_step: str, step_s: float) -> dict[str, list[str]]:
    """The trainings of one latent size and seed: name → settings; the VAE phase is the VAE's steps in
    ``vae_share`` of the budget at ``step_s`` seconds a step."""
    common = [*BASE, f"model.latent_dim={d}", f"train.seed={seed}", f"train.val_every={p['val_every']}",
              f"train.checkpoint_every={p['val_every']}", f"train.time_budget_s={p['budget_s']}"]
    phase = max(100, int(p["vae_share"] * p["budget_s"] / step_s))
    tag = f"d{d}-s{seed}"
    diffusion = [*common, "train.method=diffusion", f"em.vae_steps={phase}", f"train.steps={LONG}"]
    return {f"vae-{tag}": [*common, "train.method=vae", f"train.steps={LONG}", f"train.run=vae-{tag}"],
            f"frozen-{tag}": [*diffusion, "em.m_step=frozen", f"train.run=frozen-{tag}"],
            f"{m_step}-{tag}": [*diffusion, f"em.m_step={m_step}", f"train.run={m_step}-{tag}"]}


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--raw", default=None, help="torchvision's MNIST root (DIR/MNIST/raw/*-ubyte)")
    ap.add_argument("--workers", type=int, default=2, help="rows trained at once (one thread each)")
    ap.add_argument("--m-step", default="zstar", choices=["zstar", "encoder", "head"],
                    help="the learning-decoder schedule's M-step")
    args = ap.parse_args()
    timer = Timer()
    ws = Workspace(args.keep)
    p = PROFILES["quick" if args.quick else "full"]
    raw = raw_dir(ws, args.raw)
    data_sets = [*BASE, f"data.raw_dir={raw}"]
    ws.prepare(*data_sets)
    eval_sets = [f"eval.n_test={p['n_test']}", f"eval.ais_n={p['n_test']}", *p["eval"]]
    results: dict[str, dict[str, Any]] = {}
    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"))
    with pool:
        plan: dict[str, list[str]] = {}
        for d, seeds in p["latents"]:
            sets = [*data_sets, f"model.latent_dim={d}"]
            step_s = max(pool.map(vae_step_seconds, [str(ws.root)] * args.workers, [sets] * args.workers))
            print(f"d = {d}: a VAE step takes {1000 * step_s:.2f} ms with {args.workers} rows at once", flush=True)
            for seed in seeds:
                plan.update(rows_for(p, d, seed, args.m_step, step_s))
        plan = {name: [f"data.raw_dir={raw}", *sets] for name, sets in plan.items()}
        t0 = time.perf_counter()
        pending = {pool.submit(train_row, str(ws.root), sets, eval_sets): name for name, sets in plan.items()}
        while pending:
            for fut in wait(pending, return_when=FIRST_COMPLETED).done:
                name = pending.pop(fut)
                results[name] = fut.result()
                print(f"{name}: ELBO {results[name]['elbo_nats']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
                if name in plan and not name.startswith("vae-"):  # its control needs only its run: queue it now
                    control = pool.submit(control_row, str(ws.root), plan[name], eval_sets, results[name]["run_dir"])
                    pending[control] = f"control-{name}"
    order = [*plan, *(f"control-{name}" for name in plan if not name.startswith("vae-"))]
    rows = [_row(name, results[name], results) for name in order]
    print("\n## MNIST, dynamically binarised, at equal wall-clock (test x, nats)\n")
    cols = ["row", "latent_dim", "seed", *METRICS]
    print(table(rows, cols, 3))
    wins = _differences(results)
    print("\n## Differences (diffusion − VAE, diffusion − its control)\n")
    print(table(wins, list(wins[0]) if wins else ["row"], 3))
    print("\n## Published (Burda et al. 2015)\n")
    print(table(BURDA, ["model", "log_px_nats", "budget"], 5))
    out = {"profile": "quick" if args.quick else "full", "budget_s": p["budget_s"], "n_test": p["n_test"],
           "eval": eval_sets, "rows": rows,
           "differences": wins, "published": BURDA, "wall_seconds": timer.seconds,
           "load_average_start": timer.load_start}
    print("wrote", write_result("mnist", out, args.quick), f"in {timer.seconds:.0f} s")


def _row(name: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One table row; a control's AIS is its diffusion row's (the same decoder)."""
    out = {"row": name, **{k: r.get(k) for k in ("latent_dim", *METRICS)}}
    out["seed"] = int(name.rsplit("-s", 1)[1])
    if name.startswith("control-"):
        twin = results[name.removeprefix("control-")]
        out["ais_log_px_nats"] = twin.get("ais_log_px_nats")
        if out["ais_log_px_nats"] is not None and out["elbo_nats"] is not None:
            out["ais_gap_nats"] = out["ais_log_px_nats"] - out["elbo_nats"]
    return out


def _differences(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, r in results.items():
        if name.startswith(("vae-", "control-")):
            continue
        tag = name.split("-", 1)[1]
        vae, control = results.get(f"vae-{tag}"), results.get(f"control-{name}")
        row: dict[str, Any] = {"row": name}
        for key in ("elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "ais_log_px_nats"):
            if r.get(key) is not None and vae and vae.get(key) is not None:
                row[f"{key} − VAE"] = r[key] - vae[key]
        for key in ("elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats"):
            if r.get(key) is not None and control and control.get(key) is not None:
                row[f"{key} − control"] = r[key] - control[key]
        out.append(row)
    return out


if __name__ == "__main__":
    main()
