"""Speed and scaling of the diffusion encoder against the VAE (issue 8 item 3), on digits.

* examples/s of each EM training phase at steady state (E-step, one encoder update, one M-step,
  the whole EM step with its ``em.encoder_updates``) against one VAE step, same batch;
* encoder sampling cost against quality for 1–4, 10, 20 and 100 sampler steps (DPM++ and ancestral)
  on a briefly trained encoder: network evaluations, ms per 1 000 examples and that as a multiple
  of a VAE encoder pass (timed in turns with each setting, so a drift in the machine's speed hits both),
  reconstruction MSE (and the VAE's);
* seconds per training epoch against the training-set size and the latent size (persistent
  chains already filled: the first epoch additionally samples the encoder once per example);
* 1 vs 2 torch threads for a training step and for encoding.

Timings are medians of repeated calls, in one process, on a possibly shared machine: see the
load average stored with the results.

    python -m benchmarks.speed [--quick]
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    STEADY,
    Timer,
    Workspace,
    arg_parser,
    save_figure,
    table,
    write_result,
)
from diffenc_core import data, evaluate, optim, trainer  # noqa: E402
from diffenc_core.trainer import TrainingSet, build_method  # noqa: E402

DIGITS = ["data.dataset=digits", "model.latent_dim=8", "train.threads=1"]
BATCH = 128


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up call
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def paired_seconds(fn: Callable[[], object], unit: Callable[[], object], reps: int,
                   budget_s: float = 1.0) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``unit`` timed in turns, so a drift in the machine's speed hits both; at
    least ``reps`` pairs, more (up to 50) while they fit in about ``budget_s``."""
    t0 = time.perf_counter()
    fn()
    unit()
    reps = max(reps, min(50, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for f, ts in ((fn, times[0]), (unit, times[1])):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def phases(ws: Workspace, reps: int) -> list[dict]:
    """Steady-state cost of each EM phase (docs/method.md §3) and of a VAE step on one batch of digits."""
    split = data.load_split(ws.config(*DIGITS).data.prepared_dir, "train")
    idx = torch.arange(BATCH)
    x = split.x[idx]
    torch.manual_seed(0)
    em = build_method(ws.config(*DIGITS, "train.method=diffusion"), split.manifest)
    em.attach_data(TrainingSet(split.x))
    em.train_step(STEADY, idx, x)  # fills the persistent chains of this batch
    z_star, _ = em.e_step(STEADY, idx, x)
    cfg = em.em

    def enc_update() -> None:
        optim.update(em.losses["encoder"](x, z_star), em.opt_encoder, clip=em.clip)

    def dec_update() -> None:
        optim.update(em.decoder_loss(x, z_star), em.opt_decoder, clip=em.clip)

    timings = {
        f"E-step (MALA, {cfg.langevin_steps} steps, persistent)": median_seconds(
            lambda: em.e_step(STEADY, idx, x), reps),
        "encoder update (denoising + ELBO head, 1 Adam step)": median_seconds(enc_update, reps),
        "M-step (decoder, 1 Adam step; none by default: m_step frozen)": median_seconds(dec_update, reps),
        f"EM step total (defaults: {cfg.encoder_updates} encoder update(s), m_step {cfg.m_step})": median_seconds(
            lambda: em.train_step(STEADY, idx, x), reps),
        f"EM warm-up step ({cfg.warmup_langevin_steps} MALA steps)": median_seconds(
            lambda: em.train_step(em.vae_steps, idx, x), max(1, reps // 2)),
    }
    vae = build_method(ws.config(*DIGITS, "train.method=vae"), split.manifest)
    timings["VAE step"] = median_seconds(lambda: vae.train_step(STEADY, idx, x), reps)
    vae_s = timings["VAE step"]
    return [{"phase": name, "ms_per_batch": 1000 * s, "examples_per_s": BATCH / s, "x_vae_step": s / vae_s}
            for name, s in timings.items()]


def sampling(ws: Workspace, budget: float, step_counts: list[int], reps: int) -> tuple[list[dict], dict]:
    """Encoding cost vs quality on a diffusion encoder (and VAE) trained for ``budget`` seconds."""
    trained = {}
    for method in ("diffusion", "vae"):
        sets = [*DIGITS, f"train.method={method}", f"train.run=speed-{method}"]
        steps = ws.steps_for_budget(budget, *sets)
        cfg = ws.config(*sets, f"train.steps={steps}", f"train.time_budget_s={budget}",
                        f"train.val_every={steps}", f"train.checkpoint_every={steps}")
        run = trainer.train(cfg, "overwrite", progress=False)  # a measurement always trains afresh
        trained[method] = (evaluate.load_method(run, cfg)[0], run.status().get("steps"))
    test = data.load_split(ws.config(*DIGITS).data.prepared_dir, "test")
    x = test.x
    x1000 = x.repeat(math.ceil(1000 / len(x)), 1)[:1000]
    em, em_steps = trained["diffusion"]
    vae, vae_steps = trained["vae"]
    rows, vae_seconds = [], []
    with torch.no_grad():
        em.encoder.sample(x, steps=5, log_lik=em.log_lik)  # first-call overheads
        for sampler in ("dpmpp2m", "ancestral"):
            for steps in step_counts:
                def enc(xx: torch.Tensor, steps: int = steps, sampler: str = sampler) -> torch.Tensor:
                    return em.encoder.sample(xx, steps=steps, sampler=sampler, log_lik=em.log_lik)

                # the unit, one VAE encoder pass, is timed in turns with each sampler setting
                s, s_vae = paired_seconds(lambda enc=enc: enc(x1000), lambda: vae.encode(x1000), reps)
                vae_seconds.append(s_vae)
                torch.manual_seed(0)
                mse = torch.stack([(em.decoder.mean(enc(x)) - x).pow(2).mean() for _ in range(2)]).mean()
                rows.append({"encoder": f"diffusion {sampler}", "sampler_steps": steps,
                             "nfe": em.encoder.nfe(sampler, steps), "ms_per_1000": 1000 * s, "mse": float(mse),
                             "x_vae_encode": s / s_vae})
        torch.manual_seed(0)
        mse = torch.stack([(vae.decoder.mean(vae.encode(x)) - x).pow(2).mean() for _ in range(4)]).mean()
        rows.append({"encoder": "VAE (Gaussian)", "sampler_steps": 1, "nfe": 1,
                     "ms_per_1000": 1000 * statistics.median(vae_seconds), "mse": float(mse), "x_vae_encode": 1.0})
    n_params = {"diffusion_encoder": sum(p.numel() for p in em.encoder.parameters()),
                "vae_encoder": sum(p.numel() for p in vae.encoder.parameters()),
                "decoder": sum(p.numel() for p in vae.decoder.parameters()),
                "train_budget_s": budget, "train_steps": {"diffusion": em_steps, "vae": vae_steps}}
    return rows, n_params


def epoch_cost(ws: Workspace, sizes: list[int], latents: list[int], n_for_latent: int) -> list[dict]:
    """Seconds per epoch (steady state, chains filled) for both methods."""
    split = data.load_split(ws.config(*DIGITS).data.prepared_dir, "train")
    rows = []
    configs = [(n, 8) for n in sizes] + [(n_for_latent, d) for d in latents if d != 8 or n_for_latent not in sizes]
    for n, d in configs:
        manifest = {**split.manifest, "sizes": {**split.manifest["sizes"], "train": n}}
        x_all = split.x[:n]
        row = {"n_train": n, "latent_dim": d, "steps_per_epoch": math.ceil(n / BATCH)}
        for method in ("diffusion", "vae"):
            torch.manual_seed(0)
            m = build_method(ws.config(*DIGITS, f"train.method={method}", f"model.latent_dim={d}"), manifest)
            if method == "diffusion":
                m.attach_data(TrainingSet(x_all))
            batches = [torch.arange(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]

            def epoch(m=m, batches=batches, x_all=x_all) -> None:
                for idx in batches:
                    m.train_step(STEADY, idx, x_all[idx])

            t0 = time.perf_counter()
            epoch()  # the first epoch also initialises every persistent chain from the encoder
            row[f"{method}_first_epoch_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            epoch()
            row[f"{method}_epoch_s"] = time.perf_counter() - t0
        row["ratio"] = row["diffusion_epoch_s"] / row["vae_epoch_s"]
        rows.append(row)
        print(f"epoch n={n} d={d}: diffusion {row['diffusion_epoch_s']:.2f} s, vae {row['vae_epoch_s']:.3f} s",
              flush=True)
    return rows


def threads(ws: Workspace, reps: int) -> list[dict]:
    split = data.load_split(ws.config(*DIGITS).data.prepared_dir, "train")
    idx = torch.arange(BATCH)
    x = split.x[idx]
    x1000 = split.x[:1000]
    rows = []
    torch.manual_seed(0)
    em = build_method(ws.config(*DIGITS, "train.method=diffusion"), split.manifest)
    em.attach_data(TrainingSet(split.x))
    vae = build_method(ws.config(*DIGITS, "train.method=vae"), split.manifest)
    em.train_step(STEADY, idx, x)
    def encode() -> torch.Tensor:
        return em.encoder.sample(x1000, steps=10, log_lik=em.log_lik)

    for n in (1, 2):
        torch.set_num_threads(n)
        rows.append({
            "threads": n,
            "em_step_ms": 1000 * median_seconds(lambda: em.train_step(STEADY, idx, x), reps),
            "vae_step_ms": 1000 * median_seconds(lambda: vae.train_step(STEADY, idx, x), reps),
            "encode_10_steps_ms_per_1000": 1000 * median_seconds(encode, reps),
        })
    torch.set_num_threads(1)
    for k in ("em_step_ms", "vae_step_ms", "encode_10_steps_ms_per_1000"):
        rows.append({"threads": f"speed-up {k}", k: rows[0][k] / rows[1][k]})
    return rows


def plot(res: dict, quick: bool) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    samp = res["sampling"]
    for enc in sorted({r["encoder"] for r in samp}):
        sub = [r for r in samp if r["encoder"] == enc]
        axes[0].plot([r["ms_per_1000"] for r in sub], [r["mse"] for r in sub], "o-", label=enc)
        for r in sub:
            axes[0].annotate(str(r["nfe"]), (r["ms_per_1000"], r["mse"]), fontsize=7)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ms per 1000 examples (labels: NFE)")
    axes[0].set_ylabel("reconstruction MSE")
    axes[0].legend(fontsize=7)
    ep = res["epoch_cost"]
    by_n = [r for r in ep if r["latent_dim"] == 8]
    by_d = sorted((r for r in ep if r["n_train"] == res["n_for_latent"]), key=lambda r: r["latent_dim"])
    for method in ("diffusion", "vae"):
        axes[1].plot([r["n_train"] for r in by_n], [r[f"{method}_epoch_s"] for r in by_n], "o-", label=method)
        axes[2].plot([r["latent_dim"] for r in by_d], [r[f"{method}_epoch_s"] for r in by_d], "o-", label=method)
    axes[1].set_xlabel("training examples (d = 8)")
    axes[2].set_xlabel(f"latent size (n = {res['n_for_latent']})")
    for ax in axes[1:]:
        ax.set_ylabel("seconds per epoch")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return save_figure(fig, "speed", quick)


def main() -> None:
    ap = arg_parser(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(1)
    timer = Timer()
    ws = Workspace(args.keep)
    ws.prepare(*DIGITS)
    reps = 5 if args.quick else 15
    res: dict = {"profile": "quick" if args.quick else "full", "batch_size": BATCH, "dataset": "digits",
                 "load_average_start": timer.load_start}
    res["phases"] = phases(ws, reps)
    print("\n## Training phases (digits, batch 128, steady state)\n")
    print(table(res["phases"], ["phase", "ms_per_batch", "examples_per_s", "x_vae_step"], 3), flush=True)
    t0 = time.perf_counter()
    res["sampling"], res["models"] = sampling(ws, 15.0 if args.quick else 90.0, [1, 2, 3, 4, 10, 20, 100],
                                              1 if args.quick else 3)
    print(f"(sampling section {time.perf_counter() - t0:.0f} s)")
    print("\n## Encoding cost vs quality\n")
    print(table(res["sampling"], ["encoder", "sampler_steps", "nfe", "ms_per_1000", "x_vae_encode", "mse"], 3),
          flush=True)
    sizes = [256, 512, 1024] if args.quick else [128, 256, 512, 1024, 1437]
    res["n_for_latent"] = 512
    res["epoch_cost"] = epoch_cost(ws, sizes, [2, 8, 32] if args.quick else [2, 4, 8, 16, 32, 64], 512)
    print("\n## Epoch cost vs dataset size and latent size\n")
    print(table(res["epoch_cost"], ["n_train", "latent_dim", "steps_per_epoch", "diffusion_first_epoch_s",
                                    "diffusion_epoch_s", "vae_epoch_s", "ratio"], 3), flush=True)
    res["threads"] = threads(ws, reps)
    print("\n## 1 vs 2 threads\n")
    print(table(res["threads"], ["threads", "em_step_ms", "vae_step_ms", "encode_10_steps_ms_per_1000"], 3))
    res["plot"] = plot(res, args.quick)
    res["wall_seconds"] = timer.seconds
    print("wrote", write_result("speed", res, args.quick), f"in {timer.seconds:.0f} s")


if __name__ == "__main__":
    main()
