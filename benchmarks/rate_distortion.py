"""Rate–distortion against the VAE on digits and sprites (docs/method.md §7–§8, issue 8 item 2).

For each dataset, a beta sweep for the diffusion encoder (EM) and the Gaussian VAE, every run
given the same training wall-clock (``train.time_budget_s``; the step count is calibrated so the
cosine learning-rate schedule ends near the budget). Per run: rate (path bound for the diffusion
encoder, closed form for the VAE), distortion, ELBO, IWAE-k and the exact-log-q ELBO (the
diffusion encoder's through the sampler's Jacobian), MSE (amortised and after Langevin
refinement), linear-probe accuracy of labels and, on sprites, probes of every generating factor.
Each run is validated about 20 times and evaluated at its best checkpoint (validation −ELBO), as
in the default pipeline (``eval.checkpoint: best``).
Then the MSE of each method at the other's rates (linear interpolation of its MSE–rate curve).

    python -m benchmarks.rate_distortion [--quick] [--datasets digits sprites] [--budget S]
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    STEP_MARGIN,
    Timer,
    Workspace,
    arg_parser,
    save_figure,
    table,
    write_result,
)
from diffenc_core import metrics, runs  # noqa: E402

BETAS = [0.25, 0.5, 1.0, 2.0, 4.0]
# Validations per run (its best checkpoint is evaluated, as in the default pipeline): the VAE
# overfits 1437 digits within a 60 s budget, so scoring its last step would understate it.
VALIDATIONS = 20
METHODS = ("diffusion", "vae")

DATASETS = {
    "digits": {
        "sets": ["data.dataset=digits", "model.latent_dim=8"],
        "budget": {"quick": 5.0, "full": 60.0},
    },
    "sprites": {
        # 16x16 and MLP decoders with 128 hidden units, so that a run of a minute or two does something
        "sets": ["data.dataset=sprites", "data.count=5000", "data.image_size=16", "model.latent_dim=8",
                 "model.decoder.kind=mlp", "model.encoder.hidden=128", "model.vae.hidden=128"],
        "budget": {"quick": 5.0, "full": 90.0},
    },
}
EVAL = {
    "quick": ["eval.n_test=100", "eval.rate_steps=25", "eval.elbo_samples=1", "eval.iwae_k=4",
              "eval.refine_steps=5", "eval.exact_logq_max_dim=8", "eval.ais_temperatures=100",
              "eval.ais_check_temperatures=25"],
    "full": ["eval.n_test=500", "eval.rate_steps=100", "eval.elbo_samples=4", "eval.iwae_k=32",
             "eval.refine_steps=20", "eval.exact_logq_max_dim=8"],
}
KEEP = ("method", "beta", "train_steps", "train_seconds", "train_wall_seconds", "eval_seconds", "rate_nats",
        "distortion_nats", "elbo_nats", "elbo_exact_logq_nats", "rate_exact_logq_nats", "rate_score_integral_nats",
        "mse_amortised", "mse_refined", "psnr_amortised_db", "sigma_x", "active_units", "probe_accuracy",
        "encode_seconds_per_1000", "encoder_nfe", "sync_gap_nats", "n_test", "n_iwae")


def factor_probes(run_dir: str) -> dict[str, float]:
    """Linear probes from the posterior means to each generating factor (held-out half)."""
    lat = runs.open_run(run_dir).table(runs.LATENTS)
    if lat is None:
        return {}
    zcols = [c for c in lat.columns if c.startswith("mean_z")]
    z = lat[zcols].to_numpy()
    half = len(z) // 2
    out: dict[str, float] = {}
    for col in [c for c in lat.columns if c.startswith("factor_")]:
        f = lat[col].to_numpy()
        name = col.removeprefix("factor_")
        if name == "shape":
            y = f.astype(int)
            out["probe_acc_shape"] = metrics.probe_accuracy(z[:half], y[:half], z[half:], y[half:])
        elif name == "rotation":  # an angle: probe its cosine and sine
            for fn, tag in ((np.cos, "cos"), (np.sin, "sin")):
                g = fn(f)
                out[f"probe_r2_rotation_{tag}"] = metrics.probe_r2(z[:half], g[:half], z[half:], g[half:])
        else:
            out[f"probe_r2_{name}"] = metrics.probe_r2(z[:half], f[:half], z[half:], f[half:])
    return out


def matched_rate(rows: list[dict]) -> list[dict]:
    """At every run's rate, both methods' amortised MSE (the other's by linear interpolation of its
    MSE–rate curve; NaN outside the rates it covered) and their ratio."""
    df = pd.DataFrame(rows)
    curves = {m: df[df.method == m].sort_values("rate_nats") for m in METHODS}
    out = []
    for _, r in df.sort_values("rate_nats").iterrows():
        row = {"rate_nats": float(r["rate_nats"]), "from": f"{r['method']} β={r['beta']:g}"}
        for m, c in curves.items():
            if m == r["method"]:
                row[f"mse_{m}"] = float(r["mse_amortised"])
            elif len(c) >= 2 and c["rate_nats"].min() <= r["rate_nats"] <= c["rate_nats"].max():
                row[f"mse_{m}"] = float(np.interp(r["rate_nats"], c["rate_nats"], c["mse_amortised"]))
            else:
                row[f"mse_{m}"] = float("nan")
        row["ratio_diffusion_over_vae"] = row["mse_diffusion"] / row["mse_vae"]
        out.append(row)
    return out


def plot(name: str, rows: list[dict], quick: bool) -> str:
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, sub in df.groupby("method"):
        sub = sub.sort_values("rate_nats")
        col = "C0" if m == "diffusion" else "C1"
        axes[0].plot(sub["rate_nats"], sub["distortion_nats"], "o-", color=col, label=m)
        axes[1].plot(sub["rate_nats"], sub["mse_amortised"], "o-", color=col, label=f"{m} amortised")
        axes[1].plot(sub["rate_nats"], sub["mse_refined"], "x--", color=col, label=f"{m} + Langevin", alpha=0.5)
        for _, r in sub.iterrows():
            axes[0].annotate(f"β={r['beta']:g}", (r["rate_nats"], r["distortion_nats"]), fontsize=7)
    axes[0].set_xlabel("rate (nats)")
    axes[0].set_ylabel("distortion −E log p(x|z) (nats)")
    axes[1].set_xlabel("rate (nats)")
    axes[1].set_ylabel("MSE")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: rate–distortion, equal wall-clock per run")
    return save_figure(fig, "rate_distortion_" + name, quick)


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--budget", type=float, default=None, help="training seconds per run (overrides the profile)")
    ap.add_argument("--betas", type=float, nargs="+", default=BETAS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    profile = "quick" if args.quick else "full"
    timer = Timer()
    ws = Workspace(args.keep)
    results: dict = {"profile": profile, "betas": args.betas, "load_average_start": timer.load_start, "datasets": {}}
    for name in args.datasets:
        spec = DATASETS[name]
        budget = args.budget or spec["budget"][profile]
        ws.prepare(*spec["sets"])
        rows: list[dict] = []
        calib: dict[str, int] = {}
        for method in METHODS:
            base = [*spec["sets"], f"train.method={method}", "train.threads=1"]
            calib[method] = ws.steps_for_budget(budget, *base)
            for beta in args.betas:
                out = ws.train_and_evaluate(
                    *base, *EVAL[profile], f"train.beta={beta}", f"train.run={name}-{method}-b{beta:g}",
                    f"train.steps={calib[method]}", f"train.time_budget_s={budget}",
                    f"train.val_every={max(1, int(calib[method] / STEP_MARGIN / VALIDATIONS))}",
                    f"train.checkpoint_every={10**6}",
                )
                row = {k: out.get(k) for k in KEEP}
                row["iwae_k_nats"] = next((v for k, v in out.items() if k.startswith("iwae_")), None)
                if name == "sprites":
                    row.update(factor_probes(out["run_dir"]))
                rows.append(row)
                print(f"{name} {method} β={beta:g}: steps {row['train_steps']} rate {row['rate_nats']:.2f} "
                      f"ELBO {row['elbo_nats']:.2f} MSE {row['mse_amortised']:.4f} "
                      f"probe {row.get('probe_accuracy')}", flush=True)
        matched = matched_rate(rows)
        results["datasets"][name] = {
            "sets": spec["sets"], "eval_sets": EVAL[profile], "budget_s_per_run": budget,
            "calibrated_steps": calib, "step_margin": STEP_MARGIN, "runs": rows, "mse_at_matched_rate": matched,
            "plot": plot(name, rows, args.quick),
        }
        cols = ["method", "beta", "train_steps", "rate_nats", "distortion_nats", "elbo_nats", "elbo_exact_logq_nats",
                "iwae_k_nats", "mse_amortised", "mse_refined", "probe_accuracy"]
        if name == "sprites":
            cols += [c for c in rows[0] if c.startswith("probe_r2")]
        print(f"\n## {name} (budget {budget:g} s of training per run)\n")
        print(table(rows, cols, 3))
        print("\nMSE at matched rate\n")
        print(table(matched, ["rate_nats", "from", "mse_diffusion", "mse_vae", "ratio_diffusion_over_vae"], 3))
    results["wall_seconds"] = timer.seconds
    print("wrote", write_result("rate_distortion", results, args.quick), f"in {timer.seconds:.0f} s")


if __name__ == "__main__":
    main()
