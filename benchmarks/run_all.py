"""Run every benchmark and regenerate BENCHMARKS.md from benchmarks/results/*.json.

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--report-only]

Each benchmark runs in its own process (``python -m benchmarks.<name> [--quick]``) with
``OMP_NUM_THREADS=1``; a failing one is reported and the others still run. The report is built
from whatever result files exist: the full profile's ``<name>.json`` and the quick profile's
``<name>_quick.json`` are both shown when both exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, table
from benchmarks.load_report import section
from benchmarks.mnist import PROFILES as MNIST_PROFILES

BENCHMARKS = ("headline", "mnist", "mnist_schedules", "fixed_decoder", "posterior_fidelity", "rate_distortion", "speed",
              "distributed")
REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def run(names: list[str], quick: bool) -> dict[str, float | None]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    walls: dict[str, float | None] = {}
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if quick else [])]
        print("$ python", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=REPORT.parent).returncode
        walls[name] = time.perf_counter() - t0 if rc == 0 else None
        if rc != 0:
            print(f"benchmark {name} failed with exit status {rc}", file=sys.stderr)
    return walls


# ------------------------------------------------------------------------------------ report
def _load(stem: str) -> dict[str, Any] | None:
    path = RESULTS / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _machine(res: dict[str, Any]) -> str:
    m = res["machine"]
    load = res.get("load_average_start")
    return (f"commit `{m['commit']}` · {m['cpu']} · {m['cores']} cores · torch {m['torch']} on {m['device']}, "
            f"{m['torch_threads']} thread(s) (OMP_NUM_THREADS={m.get('omp_num_threads')}) · load average "
            f"{_la(load)} at start, {_la(m.get('load_average'))} at end · wall {res.get('wall_seconds', 0):.0f} s · "
            f"`{res.get('command', '?')}`")


def _la(v: list[float] | None) -> str:
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _num(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def _interval(row: dict[str, Any], prefix: str) -> str:
    lo, hi = row.get(f"{prefix}_ci_low_nats"), row.get(f"{prefix}_ci_high_nats")
    return f"[{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else "–"


def report_posterior(res: dict[str, Any]) -> list[str]:
    budget = (f"Training budget {res['budget_s_per_run']:g} s per encoder and toy (equal wall-clock). "
              if "budget_s_per_run" in res else f"Training: {res.get('steps')} steps per encoder (older script). ")
    out = [budget +
           "Gaps are `log p(x) − ELBO` over held-out x, nats: path-bound ELBO (ancestral sampler) and the "
           "exact-`log q` ELBO (DPM++ flow through its Jacobian), with a 95 % bootstrap interval of the mean; "
           f"{res.get('n_test', 'the')} test x. Raw Langevin's is a k-NN entropy estimate (noisy, heavy-tailed).", ""]
    rows = []
    for toy, row in res["toys"].items():
        for enc in ("diffusion", "vae", "raw_langevin"):
            r = row.get(enc, {})
            rows.append({"toy": toy, "encoder": {"vae": "Gaussian (VAE)", "raw_langevin": "raw Langevin (100 MALA)"}
                         .get(enc, "diffusion (EM)"), "steps": r.get("train_steps"),
                         "gap mean": r.get("elbo_gap_mean_nats", r.get("elbo_gap_knn_mean_nats")),
                         "95 % interval": _interval(r, "elbo_gap_mean"),
                         "gap median": r.get("elbo_gap_median_nats", r.get("elbo_gap_knn_median_nats")),
                         "exact-log-q gap mean": r.get("elbo_gap_exact_logq_mean_nats"),
                         "exact-log-q gap median": r.get("elbo_gap_exact_logq_median_nats"),
                         "mode-mass error": r.get("mode_mass_error"), "rate": r.get("rate_nats")})
    out.append(table(rows, list(rows[0]), 3))
    lg = res["toys"].get("linear_gaussian", {})
    if "rate_estimators_exact_score" in lg:
        out += ["", "**Rate estimators vs the exact KL (linear-Gaussian)** — with the exact diffused-posterior "
                "score as the encoder (isolates the estimator), nats, mean over 200 x × 10 draws:", "",
                table(lg["rate_estimators_exact_score"],
                      ["estimator", "steps", "rate_nats", "std_error_nats", "exact_kl_nats", "error_nats"], 3)]
    elif "exact_rate_nats" in lg:
        d = lg["diffusion"]
        out += ["", f"Linear-Gaussian rate of the trained diffusion encoder: path bound {_num(d.get('rate_nats'))}, "
                f"score integral {_num(d.get('rate_score_integral_nats'))}, exact log q "
                f"{_num(d.get('rate_exact_logq_nats'))}; exact KL of the true posterior {_num(lg['exact_rate_nats'])}."]
    if "rate_estimators_trained_encoder" in lg:
        t = lg["rate_estimators_trained_encoder"]
        out += ["", "With the *trained* diffusion encoder (its own rate, which equals the exact KL only if it "
                f"learned the posterior): path bound {_num(t['path_bound_nats'])}, score integral "
                f"{_num(t['score_integral_nats'])}, exact log q {_num(t['exact_logq_nats'])}; exact KL of the "
                f"true posterior {_num(t['exact_kl_of_true_posterior_nats'])}; the VAE's closed-form rate "
                f"{_num(t['vae_closed_form_nats'])}."]
    if res.get("plot"):
        out += ["", f"![posterior fidelity](benchmarks/results/{res['plot']})"]
    return out


def report_rd(res: dict[str, Any]) -> list[str]:
    out = []
    for name, d in res["datasets"].items():
        margin = (f", ×{d['step_margin']:g} so that the budget ends every run" if d.get("step_margin") else
                  " — no margin: a run could end on its step count before the budget, see train_seconds")
        out += [f"#### {name}", "",
                f"Budget {d['budget_s_per_run']:g} s of training per run (`train.steps` from a calibration: "
                f"{d['calibrated_steps']}{margin}); config `{' '.join(d['sets'])}`; "
                f"eval `{' '.join(d['eval_sets'])}`.", ""]
        cols = ["method", "beta", "train_steps", "train_seconds", "rate_nats", "distortion_nats", "elbo_nats",
                "elbo_exact_logq_nats", "iwae_k_nats", "mse_amortised", "mse_refined", "probe_accuracy"]
        extra = sorted({k for r in d["runs"] for k in r if k.startswith("probe_r2") or k == "probe_acc_shape"})
        out.append(table(d["runs"], cols + extra, 3))
        k = d["eval_sets"]
        iw = next((s.split("=")[1] for s in k if s.startswith("eval.iwae_k=")), "k")
        out += ["", f"`iwae_k_nats` is IWAE-{iw}; `elbo_exact_logq_nats` uses the exact log q (the diffusion "
                "encoder's through the DPM++ sampler's Jacobian, on a subset); `elbo_nats` uses the path-bound "
                "rate for the diffusion encoder. `probe_accuracy`: logistic probe of the label (digits: digit; "
                "sprites: shape) from posterior means, half of the test set held out; `probe_r2_*`: ridge probes "
                "of each sprites factor (rotation as cos/sin).", "",
                "**MSE at matched rate** (amortised; the other method's MSE interpolated on its MSE–rate curve, "
                "– outside its range):", "",
                table(d["mse_at_matched_rate"],
                      ["rate_nats", "from", "mse_diffusion", "mse_vae", "ratio_diffusion_over_vae"], 3),
                "", f"![R–D {name}](benchmarks/results/{d['plot']})", ""]
    return out


def report_speed(res: dict[str, Any]) -> list[str]:
    m = res["models"]
    return [
        f"Digits, batch {res['batch_size']}, medians of repeated calls. Encoder parameters: diffusion "
        f"{m['diffusion_encoder']:,}, VAE {m['vae_encoder']:,}; decoder {m['decoder']:,}.", "",
        "**Training phases** (steady state, persistent chains filled):", "",
        table(res["phases"], ["phase", "ms_per_batch", "examples_per_s", "x_vae_step"], 3), "",
        f"**Encoding cost vs quality** (encoders trained {m['train_budget_s']:g} s each: {m['train_steps']} steps; "
        "MSE of the decoder mean at the encoder's sample; `x_vae_encode`: over a VAE encoder pass timed in turns "
        "with that setting, so a drift in the machine's speed hits both; the VAE row: the median of those passes):",
        "",
        table(res["sampling"], ["encoder", "sampler_steps", "nfe", "ms_per_1000", "x_vae_encode", "mse"], 3), "",
        "**Epoch cost vs training-set size and latent size** (seconds; the first epoch also draws every "
        "persistent chain from the encoder):", "",
        table(res["epoch_cost"], ["n_train", "latent_dim", "steps_per_epoch", "diffusion_first_epoch_s",
                                  "diffusion_epoch_s", "vae_epoch_s", "ratio"], 3), "",
        "**1 vs 2 threads** (`torch.set_num_threads`; on a shared 2-core machine a second thread competes "
        "with other jobs):", "",
        table(res["threads"], ["threads", "em_step_ms", "vae_step_ms", "encode_10_steps_ms_per_1000"], 3), "",
        f"![speed](benchmarks/results/{res['plot']})",
    ]


def report_headline(res: dict[str, Any]) -> list[str]:
    cols = ["dataset", "seed", "method", "budget", "elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats",
            "ais_log_px_nats", "ais_gap_nats", "elbo_base_only_nats", "mse_amortised", "train_seconds", "train_steps"]
    return [
        "The defaults of `params.yaml` (what `make demo` runs): the diffusion run's VAE phase is the VAE "
        "baseline of the same seed, then EM with the guided encoder and `em.m_step: auto` (the decoder frozen on "
        "digits' 1 437 images, fitted to z* on the mirror file's 4 800). `equal wall-clock`: a VAE given the "
        "diffusion run's whole training time, validated every 250 steps and scored at its best checkpoint. "
        "`mirror`: a file dataset with two mirror-image posterior modes per x (not tuned for). Test x; nats; "
        "`ais_gap_nats` = AIS log p(x) − ELBO on the same x; `elbo_base_only_nats` = the diffusion encoder's "
        "Gaussian head alone.", "",
        table(res["rows"], cols, 4), "", "**Diffusion − VAE at equal steps** (nats):", "",
        table(res["differences"], list(res["differences"][0]), 3),
    ]


def report_fixed_decoder(res: dict[str, Any]) -> list[str]:
    rows, stab = [], []
    for dec, d in res["decoders"].items():
        for enc, r in d["encoders"].items():
            iw = next((k for k in r if k.startswith("iwae_") and k.endswith("_nats")), None)
            rows.append({"decoder": dec, "encoder": enc, "ELBO": r["elbo_nats"], "IWAE": r.get(iw) if iw else None,
                         "AIS − ELBO": r["elbo_gap_nats"],
                         "95 % interval": "[{:.3g}, {:.3g}]".format(*r["elbo_gap_ci"]),
                         "AIS − IWAE": r.get("iwae_gap_nats"), "steps": r.get("train_steps"),
                         "train s": r.get("train_seconds")})
        stab += [{"decoder": dec, **row} for row in d["ais_ladder"]]
    return [
        f"Digits, {res['n_test']} test x; each decoder frozen; AIS log p(x) with "
        f"{next(iter(res['decoders'].values()))['ais_temperatures']} temperatures. Gaps are AIS − bound (nats), "
        "mean with a 95 % bootstrap interval. The per-x Gaussian fits are not amortised: moment-matched to long "
        "MALA chains for each test x, they show the Gaussian family's own gap (approximation), so an amortised "
        "encoder's excess over them is its amortisation gap (Cremer et al., 2018).", "",
        table(rows, list(rows[0]), 4), "", "**AIS stability** (mean log p(x) over the test x against the ladder "
        "length; spread between two seeds):", "", table(stab, ["decoder", "temperatures", "ais_log_px_nats",
                                                               "seed_spread_nats"], 4), "",
        f"![fixed decoder](benchmarks/results/{res['plot']})",
    ]


def report_mnist(res: dict[str, Any]) -> list[str]:
    cols = ["row", "latent_dim", "seed", "elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "iwae_1000_nats",
            "ais_log_px_nats", "ais_gap_nats", "ais_ladder_change_nats", "elbo_base_only_nats", "epochs",
            "train_seconds"]
    # the eval settings the run used (results from before they were written: its profile's)
    sets = dict(s.split("=", 1) for s in res.get("eval", MNIST_PROFILES[res["profile"]]["eval"]))
    n_test = res.get("n_test", MNIST_PROFILES[res["profile"]]["n_test"])
    n_bounds, n_check = int(sets.get("eval.importance_n", 0)) or n_test, int(sets.get("eval.ais_check_n", 0)) or n_test
    return [
        f"Dynamically binarised MNIST (55 000 / 5 000 / 10 000), Bernoulli decoder, 784-200-200-d MLPs, batch 100; "
        f"every row trained {res['budget_s']} s (one thread; two rows at a time, one per core). *vae*: the whole "
        "budget, scored at its best validation checkpoint. *frozen* / *zstar*: a VAE phase of half the budget's VAE "
        "steps (timed under the rows' own load), then EM with the decoder frozen / fitted to z* (the paper's "
        "M-step), the diffusion encoder guided (docs/method.md §4). *control-…*: a Gaussian "
        "encoder from that run's VAE phase, trained by the ELBO for as long as its EM phase against its final "
        "decoder, frozen (AIS is that decoder's). ELBO: path bound for the diffusion encoder (closed form for a "
        f"Gaussian) and AIS on {n_test} test x; exact-log-q ELBO and IWAE-32 through the 10-step DPM++ flow, and "
        f"IWAE-1000 for Gaussian encoders, on the first {n_bounds} of them; AIS 400 temperatures × 2 moves × 16 "
        "particles (grown if below a bound), its rise from the half-length ladder (on the first "
        f"{n_check} x) in `ais_ladder_change_nats`. Nats. Controls queued as soon as their row was done.", "",
        table(res["rows"], cols, 4), "", "**Differences** (nats):", "",
        table(res["differences"], list(res["differences"][0]) if res["differences"] else ["row"], 3), "",
        "**Published** (Burda, Grosse & Salakhutdinov 2015, Table 1; log p(x) by IWAE-5000):", "",
        table(res["published"], ["model", "log_px_nats", "budget"], 5),
    ]


def report_mnist_schedules(res: dict[str, Any]) -> list[str]:
    conv = res.get("vae_converged_at")
    return [
        f"Dynamically binarised MNIST, d = {res['latent_dim']}, every run {res['budget_s']} s (one thread, two at a "
        "time). *half / quarter phase*: a VAE phase of that share of the VAE's steps in the budget, then EM with "
        "the M-step named; *no phase*: the paper's EM from scratch; *converged phase*: the VAE phase ends where the "
        "VAE row's validation ELBO stopped improving (2 validations without a better one)"
        + (f", step {conv}" if conv else ": it kept improving to the end, so no such rows") + ". Test x, nats; "
        "`ais − VAE's`: the decoder's AIS log p(x) minus the VAE decoder's.", "",
        table(res["rows"], ["schedule", "elbo_nats", "iwae_32_nats", "ais_log_px_nats", "ais_gap_nats",
                            "ais_ladder_change_nats", "elbo_base_only_nats", "ais − VAE's", "elbo − VAE's", "epochs",
                            "train_seconds"], 4),
    ]


def report_distributed(res: dict[str, Any]) -> list[str]:
    size = res["settings"]["image_size"]
    mem = res["memory"]
    growth = res.get("memory_summary", {})
    return [
        f"Examples per second of a real `diffenc train` at batch {res['batch_size']} (training-step time from the "
        f"run's history; the layouts take turns, median of {res['settings']['repeats']} run(s) each). digits: 8×8, "
        "d = 8, MLPs; mnist-size: 28×28 = 784-dimensional binarised sprites with the MNIST benchmark's networks "
        "(784-200-200 MLPs, d = 50, Bernoulli decoder). 2 processes: `diffenc train --nproc 2`, gloo, one thread "
        "each, equal shares of the batch, replicated chains (one all-gather per EM step). *half batch*: 1 process "
        f"at batch {res['batch_size'] // 2}; its step time over a whole batch's is what one of 2 ranks would "
        "take with free communication, so `ceiling` (a whole batch's step time over a half batch's) is the most "
        "2 processes can gain here: these networks are bound by per-operation overhead, not arithmetic.", "",
        table(res["speed"], ["workload", "step", "layout", "examples_per_s", "speedup", "ceiling",
                             "step_time_over_whole_batch", "runs"], 3), "",
        *(["**What communication costs**: a gloo all-reduce between 2 processes, idle cores, the mean of "
           "200 in a row (ms):", "", table(res["allreduce"], ["all_reduce_of", "floats", "mib", "ms"], 3), ""]
          if "allreduce" in res else []),
        "**Time to a validation −ELBO**, 1 vs 2 processes (the target is the best value both runs reach; seconds of "
        "training steps until the first validation at or below it; the runs differ in their random draws):", "",
        table(res["time_to_elbo"], ["workload", "method", "processes", "target_val_neg_elbo", "reached_at_step",
                                    "seconds", "speedup"], 4), "",
        f"**Memory on {mem[0]['images']:,} sprites** ({size}×{size}, float32 array {mem[0]['array_mib']:.0f} MiB): "
        "peak resident memory (VmHWM) of each job in a fresh process; *baseline*: that process after its imports, "
        "before any data; 2 processes: the larger rank's peak (each reads its own half of the examples).", "",
        table(mem, ["job", "images", "seconds", "peak_rss_mib", "baseline_mib", "above_baseline_mib",
                    "above_baseline_over_array"], 3), "",
        f"What grows with the data in `train`: {_num(growth.get('train_memory_growth_mib'))} MiB for 10× the images, "
        f"{_num(growth.get('train_memory_growth_over_array_growth'))}× the float32 array's growth"
        + (f" (one rank of 2: {_num(growth['rank_memory_growth_mib'])} MiB, "
           f"{_num(growth['rank_memory_growth_over_array_growth'])}×)" if "rank_memory_growth_mib" in growth else "")
        + "; the rest of a training's peak is the model, its activations and the allocator's cache (larger per "
        "rank of 2: its share of a batch varies by a few examples from step to step, so freed activation blocks fit "
        "less often).", "",
        "**Epoch time against the dataset size** (per-step cost × steps per epoch):", "",
        table(res["epochs"], ["method", "dataset", "n_train", "seconds_per_step", "seconds_per_epoch",
                              "epoch_ratio"], 3),
    ]


def headlines(results: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for stem, res in results.items():
        if stem.startswith("headline"):
            for w in res["differences"]:
                out.append(f"- **{w['dataset']}, seed {w['seed']}** ({stem}): diffusion − VAE at equal steps: ELBO "
                           f"{w['elbo_nats (diffusion − VAE)']:+.2f}, exact-log-q ELBO "
                           f"{w['elbo_exact_logq_nats (diffusion − VAE)']:+.2f}, IWAE-32 "
                           f"{w['iwae_32_nats (diffusion − VAE)']:+.2f}, AIS log p(x) "
                           f"{w['ais_log_px_nats (diffusion − VAE)']:+.2f} nats.")
        elif stem.startswith("rate_distortion"):
            for name, d in res["datasets"].items():
                by = {m: [r for r in d["runs"] if r["method"] == m] for m in ("diffusion", "vae")}
                best = {m: max((r["elbo_nats"] for r in rs), default=float("nan")) for m, rs in by.items()}
                b1 = {m: next((r for r in rs if r["beta"] == 1.0), {}) for m, rs in by.items()}
                ratios = [r["ratio_diffusion_over_vae"] for r in d["mse_at_matched_rate"]
                          if r["ratio_diffusion_over_vae"] == r["ratio_diffusion_over_vae"]]
                med = sorted(ratios)[len(ratios) // 2] if ratios else float("nan")
                out.append(
                    f"- **{name}** ({stem}, {d['budget_s_per_run']:g} s/run): best ELBO diffusion "
                    f"{_num(best['diffusion'])} vs VAE {_num(best['vae'])} nats; at β=1 ELBO "
                    f"{_num(b1['diffusion'].get('elbo_nats'))} vs {_num(b1['vae'].get('elbo_nats'))}, MSE "
                    f"{_num(b1['diffusion'].get('mse_amortised'))} vs {_num(b1['vae'].get('mse_amortised'))}, "
                    f"probe accuracy {_num(b1['diffusion'].get('probe_accuracy'))} vs "
                    f"{_num(b1['vae'].get('probe_accuracy'))}; MSE at matched rate, diffusion/VAE median ratio "
                    f"{_num(med)} over {len(ratios)} matched rates; diffusion steps in the budget "
                    f"{_num(b1['diffusion'].get('train_steps'))} vs VAE {_num(b1['vae'].get('train_steps'))}.")
        elif stem.startswith("speed"):
            ph = {r["phase"]: r for r in res["phases"]}
            em = next(r for k, r in ph.items() if k.startswith("EM step total"))
            enc = {(r["encoder"], r["sampler_steps"]): r for r in res["sampling"]}
            vae = enc.get(("VAE (Gaussian)", 1), {})
            d1 = enc.get(("diffusion ancestral", 1), {})
            d10 = enc.get(("diffusion dpmpp2m", 10), {})
            out.append(f"- **speed** ({stem}): an EM step costs {em['x_vae_step']:.2f}× a VAE step "
                       f"({em['ms_per_batch']:.1f} vs {ph['VAE step']['ms_per_batch']:.1f} ms per batch of "
                       f"{res['batch_size']}); encoding 1000 examples with the default one ancestral step takes "
                       f"{_num(d1.get('ms_per_1000'))} ms ({_num(d1.get('x_vae_encode'))}× the VAE's "
                       f"{_num(vae.get('ms_per_1000'))} ms) at MSE {_num(d1.get('mse'))} vs the VAE's "
                       f"{_num(vae.get('mse'))}; 10 DPM++ steps {_num(d10.get('x_vae_encode'))}×.")
        elif stem.startswith("posterior_fidelity"):
            bi = res["toys"].get("bimodal", {})
            lg = res["toys"].get("linear_gaussian", {})
            parts = []
            for toy, row in (("bimodal", bi), ("linear-Gaussian", lg)):
                if row:
                    d, g = row["diffusion"], row["vae"]
                    parts.append(f"{toy}: gap mean / median diffusion {_num(d.get('elbo_gap_mean_nats'))} / "
                                 f"{_num(d.get('elbo_gap_median_nats'))} vs Gaussian "
                                 f"{_num(g.get('elbo_gap_mean_nats'))} / {_num(g.get('elbo_gap_median_nats'))} nats")
            if bi:
                parts.append(f"bimodal mode-mass error diffusion {_num(bi['diffusion'].get('mode_mass_error'))} vs "
                             f"Gaussian {_num(bi['vae'].get('mode_mass_error'))} vs raw Langevin "
                             f"{_num(bi['raw_langevin'].get('mode_mass_error'))}")
            est = lg.get("rate_estimators_exact_score")
            if est:
                parts.append("rate estimators with the exact score vs the exact KL " + _num(est[0]["exact_kl_nats"])
                             + ": " + ", ".join(f"{r['estimator'].split(' (')[0]} @{r['steps']} "
                                                f"{r['error_nats']:+.3f}" for r in est))
            budget = (f"{res['budget_s_per_run']:g} s/encoder" if "budget_s_per_run" in res
                      else f"{res.get('steps')} steps")
            out.append(f"- **posterior fidelity** ({stem}, {budget}): " + "; ".join(parts))
        elif stem.startswith("mnist_schedules"):
            rows = {r["schedule"]: r for r in res["rows"]}
            best = max((r for r in res["rows"] if r["schedule"] != "vae" and r.get("ais_log_px_nats") is not None),
                       key=lambda r: r["ais_log_px_nats"], default=None)
            if best is not None and "vae" in rows:
                out.append(f"- **MNIST schedules** ({stem}, d = {res['latent_dim']}, {res['budget_s']} s each): the "
                           f"best decoder by AIS is '{best['schedule']}', {best['ais_log_px_nats']:.2f} vs the VAE's "
                           f"{_num(rows['vae'].get('ais_log_px_nats'))} nats, its encoder's ELBO "
                           f"{best['elbo_nats']:.2f} vs the VAE's {rows['vae']['elbo_nats']:.2f}.")
        elif stem.startswith("mnist"):
            for w in res["differences"]:
                parts = ", ".join(f"{k} {v:+.2f}" for k, v in w.items() if k != "row" and v is not None)
                out.append(f"- **MNIST {w['row']}** ({stem}, {res['budget_s']} s per row): {parts} nats.")
        elif stem.startswith("distributed"):
            two = {(r["workload"], r["step"]): r["speedup"] for r in res["speed"] if r["processes"] == 2}
            cap = {(r["workload"], r["step"]): r.get("ceiling") for r in res["speed"] if r["processes"] == 2}
            prep = max(r["above_baseline_over_array"] for r in res["memory"] if r["job"].startswith("prepare"))
            grows = res.get("memory_summary", {}).get("train_memory_growth_over_array_growth")
            ratios = [r["epoch_ratio"] for r in res["epochs"] if "epoch_ratio" in r]
            other = next((w for w, _ in two if w != "digits"), "sprites")
            ceil = (f" (ceiling with free communication ×{_num(cap[('digits', 'EM step')])} / "
                    f"×{_num(cap[(other, 'EM step')])})" if cap.get(("digits", "EM step")) else "")
            out.append(f"- **several processes** ({stem}): 2 processes vs 1 on 2 cores: EM step "
                       f"×{_num(two.get(('digits', 'EM step')))} on digits, ×{_num(two.get((other, 'EM step')))} "
                       f"on {other}{ceil}; VAE step ×{_num(two.get(('digits', 'VAE step')))} / "
                       f"×{_num(two.get((other, 'VAE step')))} (load average {_la(res.get('load_average_start'))} "
                       f"at start). 60 000 images: `prepare` ≤ {_num(prep)}× the float32 array above the process "
                       f"baseline; `train` grows {_num(grows)}× the array's growth; 10× the images, "
                       f"×{' / ×'.join(_num(r) for r in ratios)} the epoch time (VAE / EM).")
    return out


NOTES = [
    "- A diffusion run spends its first `em.vae_steps` (2000) on its VAE phase (a VAE step's cost), then EM; "
    "EM's first `em.warmup_steps` (20) run 60 MALA steps instead of 5. On digits the decoder saturates within "
    "the VAE phase; on sprites (16×16) the diffusion run freezes a decoder trained 2 000 steps and spends the "
    "rest of a 90 s budget on ~5 200 EM steps while the VAE trains its decoder on to ~32 500 steps: the sprites "
    "gap measures the fixed phase length (docs/method.md §10), not the encoder.",
    "- The path bound with the exact score has a per-example standard deviation of a few nats, so its mean "
    "over 200 x carries ~0.15–0.3 nats of noise; the estimator table uses 10 draws per x.",
    "- Digits has 1 437 training images: in 60 s the VAE makes ~20 000 steps (~1 800 epochs) and overfits, "
    "most at small β. Rate–distortion runs are validated ~20 times and evaluated at their best validation "
    "checkpoint (early stopping, `eval.checkpoint: best`), so each method is scored at its best held-out "
    "−ELBO within the budget.",
    "- `probe_accuracy` (from `evaluate`) fits and scores on halves of the test split (digits: 90 + 90 "
    "examples): ±0.05 noise.",
    "- Timings vary with the machine's load: compare ratios measured in the same process (the `x_vae_step` "
    "column), not absolute times across sections or profiles.",
    "- Each section names the commit it was measured at. Sections older than the headline's ran at earlier "
    "defaults (lr_encoder 1e-3 for both methods, 10 Langevin steps, 8 encoder updates, no EMA; docs/method.md "
    "§10): the quick profiles of rate–distortion and MNIST, and the dashboard and load sections (which do not "
    "depend on them).",
    "- Since `b0c3789` a chain's first E-step starts at the mean step size the other chains adapted to, not at "
    "`em.step_size` (docs/method.md §3, §11). The MNIST sections ran with it; the digits and toy sections before "
    "it, where every example is revisited every few steps and the change moves `make demo`'s numbers by at most "
    "0.03 nats.",
    "- In the MNIST full profile the diffusion rows' VAE phase is half the budget's VAE steps as a short VAE run "
    "in every worker at once times them; a row beside another's evaluation still runs its phase longer, so EM gets "
    "a little less than half the budget (the controls' `train_seconds` say how much).",
    "- Since `3f1ab6c` the diffusion encoder reads the posterior's score through the decoder (`model.encoder."
    "guidance: likelihood`, the default: docs/method.md §4). Sections that name an older commit ran the "
    "unguided encoder, now `guidance: none`.",
    "- The speed full profile at `d03f7bf` ran beside the MNIST benchmark's last row on the other core: its paired "
    "ratios (`x_vae_step`, `x_vae_encode`) hold, its absolute times are high and its 1-vs-2-thread table is "
    "meaningless (the second thread had no free core).",
    "- Since `836b947` `em.m_step: auto` fits the decoder to `z*` from 4 000 training examples up (docs/method.md "
    "§11); below that, as in every digits section, it is `frozen`.",
]


SECTIONS = {"headline": ("Diffusion encoder vs VAE: the defaults, equal steps and equal wall-clock", report_headline),
            "mnist": ("MNIST at equal wall-clock, with controls, beside Burda et al. (2015)", report_mnist),
            "mnist_schedules": ("MNIST: the EM schedules at equal wall-clock", report_mnist_schedules),
            "fixed_decoder": ("Encoders on a fixed decoder (amortised inference)", report_fixed_decoder),
            "posterior_fidelity": ("Posterior fidelity (toys with a known decoder)", report_posterior),
            "rate_distortion": ("Rate–distortion against the VAE", report_rd),
            "speed": ("Speed and scaling", report_speed),
            "distributed": ("Several processes (torch.distributed) and 60 000-image datasets", report_distributed)}


def write_report(walls: dict[str, float | None] | None = None) -> Path:
    results = {}
    for name in BENCHMARKS:
        for stem in (name, f"{name}_quick"):
            res = _load(stem)
            if res is not None:
                results[stem] = res
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.run_all` from `benchmarks/results/*.json` — do not edit by hand.",
        "`make bench` runs the full profile (meant to take under an hour on 2 idle cores); `make bench-quick` the "
        "`--quick` profile (minutes). One benchmark alone: `python -m benchmarks.<name> [--quick]`.",
        "",
        "**Read the timings with care.** Each section records the machine's load average at the start and end "
        "of its benchmark (also in the JSON): a load above the core count means processes shared the cores, so "
        "wall-clock budgets bought fewer training steps than on an idle machine. Times are noisy (±30 % or "
        "worse from run to run); ratios measured in the same process are the reliable numbers. The "
        "`--quick` profile trains for seconds: its quality numbers are smoke tests, not results — the "
        "diffusion encoder in particular gets only tens of EM steps, all inside its E-step warm-up.",
        "",
        "How runs are made equal: each run gets the same `train.time_budget_s` of training time (time spent "
        "in training steps; validation, checkpoints and evaluation are extra). `train.steps` comes from a "
        "short calibration of the step cost, times a margin (×3), so that the budget and not the step count "
        "ends each run; the cosine learning-rate schedule follows whichever of the two ends the run first "
        "(`optim.lr_scale`), so budgeted runs still reach its floor.",
        "",
        "## Headlines",
        "",
        *headlines(results),
        "",
    ]
    for name, (title, fn) in SECTIONS.items():
        for stem in (name, f"{name}_quick"):
            if stem in results:
                res = results[stem]
                profile = ("quick profile" if stem.endswith("_quick") else "full profile" if "profile" in res
                           else "an earlier run by an older version of the script")
                lines += [f"## {title} — {profile}", "", _machine(res), "", *fn(res), ""]
    lines += [*section(), ""]  # the load benchmarks (run on their own: python -m benchmarks.load_*)
    lines += ["## Notes and known gaps", "", *NOTES, ""]
    if walls:
        lines += ["## Last run_all", "", table([{"benchmark": k, "wall_s": v if v is not None else "FAILED"}
                                                for k, v in walls.items()], ["benchmark", "wall_s"], 4), ""]
    REPORT.write_text("\n".join(lines))
    return REPORT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the minutes profile of every benchmark")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    ap.add_argument("--report-only", action="store_true", help="only regenerate BENCHMARKS.md")
    args = ap.parse_args()
    walls = None if args.report_only else run(args.only, args.quick)
    print("wrote", write_report(walls))
    if walls and any(v is None for v in walls.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
