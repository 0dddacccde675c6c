"""The EM schedules on MNIST at equal wall-clock (issue 17 item 5): which decoder training pays?

Dynamically binarised MNIST, 55 000 training images, the literature's MLPs, one latent size and seed, every
run trained for the same ``budget`` seconds (one thread each, two at a time):

- ``em.m_step``: ``frozen`` (the decoder keeps the VAE phase's), ``zstar`` (the paper's: fitted to the E-step's
  ``z*``), ``encoder`` (the ELBO's decoder gradient on encoder samples), ``head`` (samples of the Gaussian head);
- the VAE phase: none (``em.vae_steps 0``: the paper's EM from scratch), a short one (a quarter of the budget's
  VAE steps), and one that ends where the VAE's validation ELBO stops improving (read off the VAE row's own
  validation curve in the same budget);
- the VAE for the whole budget, for reference.

Each run reports its ELBO, IWAE-k and the decoder's AIS log p(x) beside the encoder's gap (AIS − ELBO): a
learning decoder pays when its AIS log p(x) rises above the VAE decoder's by more than the encoder loses.

    python -m benchmarks.mnist_schedules [--quick] [--raw DIR] [--latent 16]
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result
from benchmarks.mnist import BASE, LONG, raw_dir, train_row, vae_phase_steps

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"budget_s": 30, "n_test": 200, "val_every": 250, "eval": ["eval.ais_temperatures=200",
                                                                       "eval.ais_check_temperatures=100"]},
    "full": {"budget_s": 150, "n_test": 500, "val_every": 1000, "eval": ["eval.ais_temperatures=400",
                                                                        "eval.ais_check_temperatures=200",
                                                                        "eval.ais_max_temperatures=800"]},
}
METRICS = ("elbo_nats", "iwae_32_nats", "ais_log_px_nats", "ais_gap_nats", "ais_ladder_change_nats",
           "elbo_base_only_nats", "epochs", "train_seconds")
PATIENCE = 2  # validations without a better validation ELBO that end a converged VAE phase


def converged_at(history: Any, patience: int = PATIENCE) -> int | None:
    """The step after which the VAE's validation −ELBO did not improve for ``patience`` validations."""
    val = history.dropna(subset=["val_neg_elbo"])
    best, stale = float("inf"), 0
    for step, value in zip(val["step"], val["val_neg_elbo"], strict=True):
        if value < best:
            best, stale, at = value, 0, int(step)
        else:
            stale += 1
            if stale >= patience:
                return at
    return None


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--raw", default=None, help="torchvision's MNIST root (DIR/MNIST/raw/*-ubyte)")
    ap.add_argument("--latent", type=int, default=16, help="latent size")
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once (one thread each)")
    args = ap.parse_args()
    timer = Timer()
    ws = Workspace(args.keep)
    p = PROFILES["quick" if args.quick else "full"]
    raw = raw_dir(ws, args.raw)
    common = [f"data.raw_dir={raw}", *BASE, f"model.latent_dim={args.latent}", f"train.val_every={p['val_every']}",
              f"train.checkpoint_every={p['val_every']}", f"train.time_budget_s={p['budget_s']}"]
    ws.prepare(*common)
    eval_sets = [f"eval.n_test={p['n_test']}", f"eval.ais_n={p['n_test']}", *p["eval"]]
    full_phase = vae_phase_steps(ws, common, p["budget_s"])
    diffusion = [*common, "train.method=diffusion", f"train.steps={LONG}"]
    plan = {"vae": [*common, "train.method=vae", f"train.steps={LONG}", "train.run=vae"]}
    for m_step in ("frozen", "zstar", "encoder", "head"):
        plan[f"half phase, {m_step}"] = [*diffusion, f"em.vae_steps={full_phase // 2}", f"em.m_step={m_step}",
                                         f"train.run=half-{m_step}"]
    plan["quarter phase, zstar"] = [*diffusion, f"em.vae_steps={full_phase // 4}", "em.m_step=zstar",
                                    "train.run=quarter-zstar"]
    plan["no phase (paper's EM), zstar"] = [*diffusion, "em.vae_steps=0", "em.m_step=zstar", "train.run=none-zstar"]
    results: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        t0 = time.perf_counter()
        futures = {name: pool.submit(train_row, str(ws.root), sets, eval_sets) for name, sets in plan.items()}
        for name, fut in futures.items():
            results[name] = fut.result()
            print(f"{name}: ELBO {results[name]['elbo_nats']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        from diffenc_core import runs

        history = runs.Run(ws.root / "runs" / "vae").history()
        at = converged_at(history) if history is not None else None
        if at is not None:  # the VAE phase ends where the VAE converged within this budget
            late = {f"converged phase ({at} steps), {m}": pool.submit(
                train_row, str(ws.root), [*diffusion, f"em.vae_steps={at}", f"em.m_step={m}",
                                          f"train.run=converged-{m}"], eval_sets) for m in ("frozen", "zstar")}
            for name, fut in late.items():  # both at once, one per worker
                results[name] = fut.result()
                print(f"{name}: ELBO {results[name]['elbo_nats']:.2f}", flush=True)
    rows = [{"schedule": name, **{k: r.get(k) for k in METRICS}} for name, r in results.items()]
    vae_ais = results["vae"].get("ais_log_px_nats")
    for row in rows:
        if vae_ais is not None and row.get("ais_log_px_nats") is not None:
            row["ais − VAE's"] = row["ais_log_px_nats"] - vae_ais
            row["elbo − VAE's"] = row["elbo_nats"] - results["vae"]["elbo_nats"]
    print(f"\n## EM schedules, MNIST d = {args.latent}, {p['budget_s']} s each (test x, nats)\n")
    print(table(rows, ["schedule", *METRICS, "ais − VAE's", "elbo − VAE's"], 3))
    out = {"profile": "quick" if args.quick else "full", "latent_dim": args.latent, "budget_s": p["budget_s"],
           "vae_converged_at": at, "rows": rows, "wall_seconds": timer.seconds, "load_average_start": timer.load_start}
    print("wrote", write_result("mnist_schedules", out, args.quick), f"in {timer.seconds:.0f} s")


if __name__ == "__main__":
    main()
