"""Data-parallel training (issue 13): does a second process pay on this machine, and does a 60 000-image
dataset fit in memory?

* examples per second of the EM step and of the VAE step for 1 process × 1 thread, 1 process × 2
  threads and 2 processes × 1 thread (``diffenc train --nproc 2``), each a real ``diffenc train`` at
  the default batch (128), read from the run's history (training-step time only, after the first
  steps); the layouts take turns, ``repeats`` times, and the median counts. Two workloads: digits
  (8×8, d = 8: small MLPs) and an MNIST-size step (28×28 = 784-dimensional binarised sprites, the MNIST
  benchmark's networks: 784-200-200 MLPs, d = 50, Bernoulli decoder); each rank trains its equal share of
  the global batch and the E-step chains are replicated (one all-gather per EM step);
* the ceiling of 2 processes: 1 process × 1 thread at half the batch. Two ranks with free communication
  would each take that step's time for the whole batch, so ``ceiling = time(batch) / time(batch / 2)``;
* what communication costs: a gloo all-reduce between 2 processes of a few numbers (the per-step agreement)
  and of each workload's encoder gradients (the EM step's DistributedDataParallel all-reduce), idle cores;
* time to a fixed validation −ELBO with 1 vs 2 processes, both methods (the target is the best value
  both runs reach; the time is training-step time at the first validation at or below it);
* peak resident memory (the kernel's high-water mark, VmHWM) of ``prepare`` and ``train`` (1 and 2 processes) on
  60 000 sprites, and of preparing the same images from a PNG folder and from a Parquet file, against
  the float32 array size; seconds per epoch at 10 % and 100 % of the dataset (linear in its size?).

Every measurement runs in a fresh process; the load average is recorded with the results (2 shared
cores: a second process competes with whatever else runs).

    python -m benchmarks.distributed [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"repeats": 1, "image_size": 28, "epoch_steps": {"vae": 10, "diffusion": 3},
              # workload: (steps, log_every, first step counted) of the EM step and of the VAE step
              "speed": {"digits": {"EM": (50, 2, 10), "VAE": (400, 20, 100)},
                        "mnist-size": {"EM": (40, 2, 10), "VAE": (200, 10, 40)}},
              "elbo": {"digits vae": {"steps": 400, "val_every": 25},
                       "digits diffusion": {"vae": 50, "steps": 100, "val_every": 10},
                       "mnist-size vae": {"steps": 120, "val_every": 10}}},
    "full": {"repeats": 2, "image_size": 32, "epoch_steps": {"vae": 20, "diffusion": 4},
             "speed": {"digits": {"EM": (120, 2, 20), "VAE": (1500, 50, 200)},
                       "mnist-size": {"EM": (120, 5, 20), "VAE": (800, 40, 200)}},
             "elbo": {"digits vae": {"steps": 1500, "val_every": 50},
                      "digits diffusion": {"vae": 200, "steps": 300, "val_every": 25},
                      "mnist-size vae": {"steps": 300, "val_every": 20}}},
}
WORKLOADS = {"digits": ["data.dataset=digits", "model.latent_dim=8"],
             "mnist-size": ["data.dataset=sprites", "data.image_size=28", "data.count=6000", "data.binarize=dynamic",
                            "model.latent_dim=50", "model.decoder.hidden=200", "model.vae.hidden=200"]}
BATCH = 128
HALF = "1 process × 1 thread, half batch"
LAYOUTS = [("1 process × 1 thread", 1, 1, BATCH), ("1 process × 2 threads", 1, 2, BATCH),
           ("2 processes × 1 thread", 2, 1, BATCH), (HALF, 1, 1, BATCH // 2)]
"""(label, processes, threads per process, global batch)"""
COMMON = [f"train.batch_size={BATCH}"]
ALLREDUCE_REPS = 200
POLL_S = 0.2  # how often the ranks' memory high-water marks are read
SPEED_CAP_S = 60
"""Training seconds a throughput run may take: threads that spin-wait on a core another job holds can
make a step a hundred times slower, and such a run is measured on the steps it made."""
STEADY_EM = ["em.vae_steps=0", "em.warmup_steps=0"]  # every step a steady EM step
BIG_COUNT = 60_000
SMALL_SHARE = 10  # the epoch-time comparison also trains on 1/SMALL_SHARE of the big dataset
RSS_STEPS = 20  # training steps of the memory runs (loading the data is what they measure)
KIB = 1024
MIB = 1024 * KIB
LAUNCH_TIMEOUT_S = 1800


# ----------------------------------------------------------------------------------- running
def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "DIFFENC_PREFECT": "0"}


def train_run(ws: Workspace, name: str, sets: list[str], nproc: int = 1, threads: int = 1) -> Any:
    """``diffenc train`` in a fresh process; its history (pandas)."""
    args = [f"train.run={name}", f"train.threads={threads}", *sets]
    cmd = [sys.executable, "-m", "flows.cli", "train", "--no-progress", "--overwrite", "--nproc", str(nproc),
           *[a for s in (*[f"data.root={ws.root / 'data'}", f"train.runs_dir={ws.root / 'runs'}"], *args)
             for a in ("--set", s)]]
    subprocess.run(cmd, check=True, env=_env(threads), timeout=LAUNCH_TIMEOUT_S, stdout=subprocess.DEVNULL)
    from diffenc_core import runs

    return runs.Run(ws.root / "runs" / name).history()


def throughput(history: Any, skip: int, batch: int = BATCH) -> float:
    """Examples per second of training-step time after step ``skip`` (first-call costs); after the first
    logged step when a run capped by SPEED_CAP_S did not get that far."""
    rows = history[history["step"] >= skip]
    if len(rows) < 2:
        rows = history.iloc[1:] if len(history) > 2 else history
    first, last = rows.iloc[0], rows.iloc[-1]
    return batch * (last["step"] - first["step"]) / (last["time_s"] - first["time_s"])


def speeds(ws: Workspace, p: dict[str, Any]) -> list[dict[str, Any]]:
    """Examples per second per workload, step and layout; the layouts take turns, ``repeats`` rounds."""
    methods = {"EM": ["train.method=diffusion", *STEADY_EM], "VAE": ["train.method=vae"]}
    measured: dict[tuple[str, str, str], list[float]] = {}
    for round_ in range(p["repeats"]):
        for workload, data_sets in WORKLOADS.items():
            for method, sets in methods.items():
                steps, log_every, skip = p["speed"][workload][method]
                for layout, nproc, threads, batch in LAYOUTS:
                    hist = train_run(ws, "speed", [*data_sets, f"train.batch_size={batch}", *sets,
                                                   f"train.steps={steps}", f"train.log_every={log_every}",
                                                   f"train.val_every={steps}", f"train.checkpoint_every={steps}",
                                                   f"train.time_budget_s={SPEED_CAP_S}"], nproc, threads)
                    rate = throughput(hist, skip, batch)
                    measured.setdefault((workload, method, layout), []).append(rate)
                    done = int(hist["step"].max())
                    capped = f" (capped at {SPEED_CAP_S} s: {done} of {steps} steps)" if done < steps else ""
                    print(f"round {round_}: {workload} {method} step, {layout}: {rate:.0f} examples/s{capped}",
                          flush=True)
    rows = []
    for workload in WORKLOADS:
        for method in methods:
            base = statistics.median(measured[(workload, method, LAYOUTS[0][0])])
            # free communication: each of 2 ranks takes a half batch's step time for the whole batch
            ceiling = 2 * statistics.median(measured[(workload, method, HALF)]) / base
            for layout, nproc, threads, batch in LAYOUTS:
                rates = measured[(workload, method, layout)]
                row = {"workload": workload, "step": f"{method} step", "layout": layout, "processes": nproc,
                       "threads": threads, "batch": batch, "examples_per_s": statistics.median(rates),
                       "runs": [round(float(r), 1) for r in rates], "speedup": statistics.median(rates) / base}
                if layout == HALF:  # it tells a step's time, not a speed-up: a half batch's over a whole one's
                    row["speedup"] = None
                    row["step_time_over_whole_batch"] = 1 / ceiling
                if nproc == 2:
                    row["ceiling"] = ceiling
                rows.append(row)
    return rows


def allreduce_costs(ws: Workspace) -> list[dict[str, Any]]:
    """Milliseconds per gloo all-reduce between 2 processes on idle cores: a few numbers (the per-step
    agreement) and each workload's encoder gradients (the EM step's DDP all-reduce)."""
    from diffenc_core import data, trainer

    sizes = {"a few numbers (the per-step agreement)": 2}
    for workload, data_sets in WORKLOADS.items():
        cfg = ws.config(*data_sets, "train.method=diffusion")
        manifest = data.load_split(cfg.data.prepared_dir, "train").manifest
        encoder = trainer.build_method(cfg, manifest).encoder
        sizes[f"the {workload} encoder's gradients"] = sum(p.numel() for p in encoder.parameters())
    ms = _allreduce_ms(list(sizes.values()))
    rows = [{"all_reduce_of": what, "floats": n, "mib": n * 4 / MIB, "ms": t}
            for (what, n), t in zip(sizes.items(), ms, strict=True)]
    for r in rows:
        print(f"all-reduce of {r['all_reduce_of']} ({r['floats']} floats): {r['ms']:.2f} ms", flush=True)
    return rows


def _allreduce_rank(rank: int, port: int, numels: list[int], out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    times = []
    for n in numels:
        t = torch.ones(n)
        for _ in range(10):  # connection set-up and first-call costs
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(ALLREDUCE_REPS):
            dist.all_reduce(t)
        times.append(1000 * (time.perf_counter() - t0) / ALLREDUCE_REPS)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def _allreduce_ms(numels: list[int]) -> list[float]:
    """2 gloo ranks in fresh processes: ms per all-reduce of each size."""
    import torch.multiprocessing as mp

    from benchmarks.servers import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    ranks = [ctx.Process(target=_allreduce_rank, args=(r, port, numels, out)) for r in range(2)]
    for r in ranks:
        r.start()
    times = out.get(timeout=LAUNCH_TIMEOUT_S)
    for r in ranks:
        r.join()
    return times


def time_to_elbo(ws: Workspace, p: dict[str, Any]) -> list[dict[str, Any]]:
    """Training-step seconds until the validation −ELBO first reaches the best value both layouts reach."""
    rows = []
    for name, job in p["elbo"].items():
        workload, method = name.split()
        sets = [*WORKLOADS[workload], *COMMON, f"train.method={method}", f"train.steps={job['steps']}",
                f"train.val_every={job['val_every']}", "train.checkpoint_every=100000"]
        if method == "diffusion":
            sets.append(f"em.vae_steps={job['vae']}")
        curves = {}
        for nproc in (1, 2):
            hist = train_run(ws, f"elbo-{workload}-{method}-{nproc}", sets, nproc)
            curves[nproc] = hist.dropna(subset=["val_neg_elbo"])
        target = max(c["val_neg_elbo"].min() for c in curves.values())
        for nproc, curve in curves.items():
            hit = curve[curve["val_neg_elbo"] <= target].iloc[0]
            rows.append({"workload": workload, "method": method, "processes": nproc, "target_val_neg_elbo": target,
                         "reached_at_step": int(hit["step"]), "seconds": float(hit["time_s"]),
                         "best_val_neg_elbo": float(curve["val_neg_elbo"].min()),
                         "total_steps": int(curve["step"].max()), "total_seconds": float(curve["time_s"].max())})
        one, two = (r for r in rows[-2:])
        two["speedup"] = one["seconds"] / two["seconds"]
        print(f"{workload} {method}: −ELBO ≤ {target:.2f} after {one['seconds']:.1f} s (1 process), "
              f"{two['seconds']:.1f} s (2)", flush=True)
    return rows


# ------------------------------------------------------------------------------------ memory
def high_water(pid: int | str = "self") -> int:
    """A process's peak resident memory so far (VmHWM, bytes; 0 once it is gone). Not getrusage's
    ru_maxrss: a child's starts at its parent's resident size when it forked."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB
    except OSError:
        pass
    return 0


class RankMemory:
    """The largest peak resident memory among this process's children (the ranks), read every POLL_S."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(POLL_S):
            for children in Path("/proc/self/task").glob("*/children"):
                for pid in map(int, children.read_text().split()):
                    self.peaks[pid] = max(self.peaks.get(pid, 0), high_water(pid))

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peaks.values(), default=0)


def memory_job(kind: str, root: str, sets: list[str]) -> dict[str, Any]:
    """Run in a fresh process (``--memory-job``): one prepare or train, its peak resident memory and
    its baseline (after the imports, before any data)."""
    from diffenc_core import config, data, trainer
    from flows import entry

    base = high_water()
    cfg = config.load(None, [f"data.root={root}/data", f"train.runs_dir={root}/runs", *sets])
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "prepare":
        data.prepare(cfg.data)
    elif cfg.train.nproc > 1:
        ranks = RankMemory()
        entry.train_entry(cfg, overwrite=True, progress=False)
        out["rank_peak_bytes"] = ranks.stop()
    else:
        hist = trainer.train(cfg, "overwrite", progress=False).history()
        out["seconds_per_step"] = float((hist["time_s"].iloc[-1] - hist["time_s"].iloc[0])
                                        / (hist["step"].iloc[-1] - hist["step"].iloc[0]))
    out["seconds"] = time.perf_counter() - t0
    out["baseline_bytes"] = base
    out["peak_bytes"] = high_water()
    return out


def _memory(ws: Workspace, kind: str, sets: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--memory-job", kind, str(ws.root), *sets]
    res = subprocess.run(cmd, check=True, env=_env(1), timeout=LAUNCH_TIMEOUT_S, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_user_files(ws: Workspace, size: int) -> tuple[Path, Path]:
    """The 60 000 sprites as a PNG folder (one sub-folder per shape) and as a Parquet file (list column)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffenc_core import data

    arrays = data.sprites(BIG_COUNT, size, 0)
    pixels = (arrays.x * 255).round().astype(np.uint8).reshape(BIG_COUNT, size, size)
    png = ws.root / "png"
    for name in data.SPRITE_SHAPES:
        (png / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(pixels, arrays.label, strict=True)):
        Image.fromarray(img).save(png / data.SPRITE_SHAPES[label] / f"{i:05d}.png")
    parquet = ws.root / "sprites.parquet"
    values = pa.array(arrays.x.reshape(-1), type=pa.float32())
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(values, size * size),
                             "label": pa.array(arrays.label)}), parquet, row_group_size=4096)
    return png, parquet


def memory(ws: Workspace, p: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Peak resident memory of prepare and train on 60 000 images (what grows with the data: train on
    all of them against train on 10 %), and seconds per epoch at 10 % and 100 % of them."""
    size = p["image_size"]
    array_bytes = BIG_COUNT * size * size * 4
    sprites = ["data.dataset=sprites", f"data.count={BIG_COUNT}", f"data.image_size={size}"]
    small = ["data.dataset=sprites", f"data.count={BIG_COUNT // SMALL_SHARE}", f"data.image_size={size}",
             "data.root=" + str(ws.root / "small")]
    tiny_train = ["train.method=vae", f"train.steps={RSS_STEPS}", f"train.val_every={RSS_STEPS}",
                  f"train.checkpoint_every={RSS_STEPS}"]
    png, parquet = write_user_files(ws, size)
    jobs = [
        ("prepare sprites", BIG_COUNT, "prepare", sprites),
        ("prepare PNG folder", BIG_COUNT, "prepare", ["data.dataset=file", f"data.path={png}",
                                                      "data.root=" + str(ws.root / "p")]),
        ("prepare Parquet file", BIG_COUNT, "prepare", ["data.dataset=file", f"data.path={parquet}",
                                                        "data.root=" + str(ws.root / "q")]),
        ("prepare sprites (10 %)", BIG_COUNT // SMALL_SHARE, "prepare", small),
        ("train, 1 process", BIG_COUNT, "train", [*sprites, *tiny_train]),
        ("train, 1 process (10 %)", BIG_COUNT // SMALL_SHARE, "train", [*small, *tiny_train]),
        ("train, 2 processes (per process)", BIG_COUNT, "train", [*sprites, *tiny_train, "train.nproc=2"]),
        ("train, 2 processes (per process, 10 %)", BIG_COUNT // SMALL_SHARE, "train",
         [*small, *tiny_train, "train.nproc=2"]),
    ]
    rows = []
    for name, images, kind, sets in jobs:
        m = _memory(ws, kind, sets)
        peak = m.get("rank_peak_bytes", m["peak_bytes"])
        rows.append({"job": name, "images": images, "seconds": m["seconds"], "array_mib": array_bytes / MIB,
                     "baseline_mib": m["baseline_bytes"] / MIB, "peak_rss_mib": peak / MIB,
                     "above_baseline_mib": (peak - m["baseline_bytes"]) / MIB,
                     "peak_over_array": peak / array_bytes,
                     "above_baseline_over_array": (peak - m["baseline_bytes"]) / array_bytes})
        print(f"{name}: peak {peak / MIB:.0f} MiB ({m['baseline_bytes'] / MIB:.0f} before the data; array "
              f"{array_bytes / MIB:.0f} MiB) in {m['seconds']:.0f} s", flush=True)
    by = {r["job"]: r for r in rows}
    array_growth = array_bytes * (1 - 1 / SMALL_SHARE)
    growth = (by["train, 1 process"]["peak_rss_mib"] - by["train, 1 process (10 %)"]["peak_rss_mib"]) * MIB
    rank_growth = (by["train, 2 processes (per process)"]["peak_rss_mib"]
                   - by["train, 2 processes (per process, 10 %)"]["peak_rss_mib"]) * MIB
    summary = {"train_memory_growth_mib": growth / MIB,
               "train_memory_growth_over_array_growth": growth / array_growth,
               "rank_memory_growth_mib": rank_growth / MIB,
               "rank_memory_growth_over_array_growth": rank_growth / array_growth}
    print(f"train: {growth / MIB:.0f} MiB more for 10× the images ({growth / array_growth:.2f}× the array's growth); "
          f"a rank of 2: {rank_growth / MIB:.0f} MiB ({rank_growth / array_growth:.2f}×)", flush=True)
    epochs = []
    for method, extra in (("vae", []), ("diffusion", STEADY_EM)):
        for label, sets, n in (("10 %", small, BIG_COUNT // SMALL_SHARE), ("100 %", sprites, BIG_COUNT)):
            steps = p["epoch_steps"][method]
            m = _memory(ws, "train", [*sets, f"train.method={method}", *extra, f"train.steps={steps}",
                                      "train.log_every=1", f"train.val_every={steps}",
                                      f"train.checkpoint_every={steps}"])
            n_train = round(n * 0.8)
            epochs.append({"method": method, "dataset": label, "n_train": n_train,
                           "seconds_per_step": m["seconds_per_step"],
                           "seconds_per_epoch": m["seconds_per_step"] * n_train / BATCH})
        small_row, big_row = epochs[-2:]
        big_row["epoch_ratio"] = big_row["seconds_per_epoch"] / small_row["seconds_per_epoch"]
        print(f"{method}: {small_row['seconds_per_step'] * 1000:.1f} vs {big_row['seconds_per_step'] * 1000:.1f} ms "
              f"per step at 10 % vs 100 % of the data", flush=True)
    return rows, summary, epochs


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--memory-job", nargs="+", help=argparse.SUPPRESS)  # KIND ROOT SET...: one measured job
    args = ap.parse_args()
    if args.memory_job:
        kind, root, *sets = args.memory_job
        print(json.dumps(memory_job(kind, root, sets)))
        return
    profile = "quick" if args.quick else "full"
    p = PROFILES[profile]
    timer = Timer()
    ws = Workspace(args.keep)
    for data_sets in WORKLOADS.values():
        ws.prepare(*data_sets)
    res: dict[str, Any] = {"profile": profile, "batch_size": BATCH, "load_average_start": timer.load_start,
                           "settings": p}
    res["speed"] = speeds(ws, p)
    print("\n## Examples per second\n")
    print(table(res["speed"], ["workload", "step", "layout", "examples_per_s", "speedup", "ceiling", "runs"], 3),
          flush=True)
    res["allreduce"] = allreduce_costs(ws)
    res["time_to_elbo"] = time_to_elbo(ws, p)
    print("\n## Time to a validation −ELBO\n")
    print(table(res["time_to_elbo"], ["workload", "method", "processes", "target_val_neg_elbo", "reached_at_step",
                                      "seconds", "speedup"], 4), flush=True)
    res["memory"], res["memory_summary"], res["epochs"] = memory(ws, p)
    print("\n## Memory on 60 000 images\n")
    print(table(res["memory"], ["job", "images", "seconds", "array_mib", "baseline_mib", "peak_rss_mib",
                                "above_baseline_mib", "above_baseline_over_array"], 3))
    print(table(res["epochs"], ["method", "dataset", "n_train", "seconds_per_step", "seconds_per_epoch",
                                "epoch_ratio"], 3))
    res["wall_seconds"] = timer.seconds
    print("wrote", write_result("distributed", res, args.quick), f"in {timer.seconds:.0f} s")


if __name__ == "__main__":
    main()
