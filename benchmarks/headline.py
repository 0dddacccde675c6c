"""The headline comparison: the default diffusion encoder against the VAE, at equal steps and at
equal wall-clock, on two seeds, with every bound (ELBO, exact-log-q ELBO, IWAE, AIS log p(x)).

- **digits** with the defaults of ``params.yaml`` (what ``make demo`` runs), seeds 0 and 1;
- **equal wall-clock**: a VAE given the diffusion run's whole training time (its VAE phase
  included) as ``train.time_budget_s``, validated often and scored at its best checkpoint, so
  the extra time can only help it;
- **mirror**: a user-style file dataset this project did not tune for, ``x = g(z) + noise`` with
  ``g(z) = g(−z)``, so every x has two mirror-image posterior modes (2 latents, 5 features), with
  the defaults and ``model.latent_dim=2``.

    python -m benchmarks.headline [--quick]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result

SEEDS = (0, 1)
METRICS = ("elbo_nats", "elbo_exact_logq_nats", "iwae_32_nats", "ais_log_px_nats", "ais_gap_nats",
           "elbo_base_only_nats", "mse_amortised", "train_seconds", "train_steps", "n_test", "n_ais")
QUICK = ["train.steps=200", "em.vae_steps=200", "eval.ais_temperatures=100", "eval.ais_check_temperatures=25"]
VAL_EVERY_BUDGET = 250  # validations of the equal-wall-clock VAE (best checkpoint among them)
MIRROR_COUNT = 6000
MIRROR_NOISE = 0.1


def mirror_dataset(path: Path, count: int = MIRROR_COUNT, seed: int = 123) -> Path:
    """``x = g(z) + noise`` with ``g(z) = g(−z)``: every posterior has two mirror-image modes."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((count, 2))
    x = np.stack([z[:, 0] ** 2, z[:, 1] ** 2, z[:, 0] * z[:, 1], 0.5 * (z[:, 0] + z[:, 1]) ** 2,
                  np.cos(z[:, 0]) + 0.3 * z[:, 1] ** 2], 1)
    x = x + MIRROR_NOISE * rng.standard_normal(x.shape)
    np.savez(path, x=x.astype(np.float32))
    return path


def pair(ws: Workspace, name: str, sets: list[str], seed: int, equal_time: bool) -> list[dict[str, Any]]:
    """VAE and diffusion encoder with the same seed (and, optionally, the VAE at equal wall-clock)."""
    rows = []
    base = [*sets, f"train.seed={seed}"]
    diff = ws.train_and_evaluate(*base, "train.method=diffusion", f"train.run={name}-diffusion-s{seed}")
    vae = ws.train_and_evaluate(*base, "train.method=vae", f"train.run={name}-vae-s{seed}")
    rows += [{"dataset": name, "seed": seed, "method": "diffusion", "budget": "default steps", **diff},
             {"dataset": name, "seed": seed, "method": "vae", "budget": "default steps", **vae}]
    if equal_time:
        budget = diff["train_seconds"]
        long = ws.train_and_evaluate(*base, "train.method=vae", f"train.run={name}-vae-time-s{seed}",
                                     "train.steps=1000000", f"train.time_budget_s={budget}",
                                     f"train.val_every={VAL_EVERY_BUDGET}",
                                     f"train.checkpoint_every={VAL_EVERY_BUDGET}")
        rows.append({"dataset": name, "seed": seed, "method": "vae", "budget": f"{budget:.0f} s (= diffusion)", **long})
    for r in rows[-3:]:
        print(name, seed, r["method"], r["budget"], {k: round(r[k], 3) for k in METRICS if isinstance(r.get(k), float)},
              flush=True)
    return rows


def main() -> None:
    ap = arg_parser(__doc__)
    args = ap.parse_args()
    timer = Timer()
    ws = Workspace(args.keep)
    quick = QUICK if args.quick else []
    every_x = f"eval.ais_n={ws.config().eval.n_test}"
    digits = ["data.dataset=digits", "train.threads=1", every_x, *quick]
    ws.prepare(*digits)
    rows = []
    for seed in SEEDS:
        rows += pair(ws, "digits", digits, seed, equal_time=True)
    path = mirror_dataset(ws.root / "mirror.npz")
    mirror = ["data.dataset=file", f"data.path={path}", "model.latent_dim=2", "train.threads=1", every_x, *quick]
    ws.prepare(*mirror)
    rows += pair(ws, "mirror", mirror, SEEDS[0], equal_time=False)

    wins = []
    for name in ("digits", "mirror"):
        for seed in SEEDS:
            sel = {r["method"] + r["budget"]: r for r in rows if r["dataset"] == name and r["seed"] == seed}
            d, v = sel.get("diffusiondefault steps"), sel.get("vaedefault steps")
            if d and v:
                wins.append({"dataset": name, "seed": seed,
                             **{f"{k} (diffusion − VAE)": d[k] - v[k] for k in METRICS[:4]}})
    cols = ["dataset", "seed", "method", "budget", *METRICS]
    print("\n## Diffusion encoder vs VAE (test x; nats)\n")
    print(table(rows, cols, 4))
    print("\n## Differences at equal steps\n")
    print(table(wins, list(wins[0]), 3))
    result = {"profile": "quick" if args.quick else "full", "rows": [{k: r.get(k) for k in cols} for r in rows],
              "differences": wins, "wall_seconds": timer.seconds, "load_average_start": timer.load_start}
    print("wrote", write_result("headline", result, args.quick), f"in {timer.seconds:.0f} s")


if __name__ == "__main__":
    main()
