"""Shared helpers for the benchmark scripts: machine facts, result files, a scratch workspace,
equal-wall-clock training (a step count calibrated so the cosine schedule ends near the budget,
with ``train.time_budget_s`` as the hard cap) and plain-text tables."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diffenc_core import config, data, evaluate, runs, trainer

RESULTS = Path(__file__).resolve().parent / "results"
STEADY = 10**6  # a step index past every warm-up phase, for steady-state timings
STEP_MARGIN = 3.0  # calibrated steps x this, so the time budget (not the step count) ends a run


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average says how shared the machine was)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "diffenc_core"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average": list(os.getloadavg()),
    }


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` and ``--keep DIR``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="minutes, not an hour")
    ap.add_argument("--keep", default=None, help="keep the workspace in this folder")
    return ap


def save_figure(fig: Any, name: str, quick: bool) -> str:
    """Write ``fig`` as ``results/<name>[_quick].png`` and return the file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = RESULTS / f"{result_name(name, quick)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def result_name(name: str, quick: bool) -> str:
    """``<name>`` for the full profile, ``<name>_quick`` for ``--quick`` (both can coexist)."""
    return f"{name}_quick" if quick else name


def write_result(name: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """``results/<name>[_quick].json`` with the machine, the command and the load average."""
    path = RESULTS / f"{result_name(name, quick)}.json"
    payload.setdefault("command", "python -m benchmarks." + name + "".join(" " + a for a in sys.argv[1:]))
    runs.atomic_write_json(path, {"machine": machine(), **payload})
    return path


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.load_start = list(os.getloadavg())

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


class Workspace:
    """A scratch folder for prepared data and runs (kept only with keep=True)."""

    def __init__(self, keep: str | None = None):
        self.root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="diffenc-bench-"))
        self.root.mkdir(parents=True, exist_ok=True)

    def config(self, *sets: str) -> config.Config:
        return config.load(None, [f"data.root={self.root / 'data'}", f"train.runs_dir={self.root / 'runs'}", *sets])

    def prepare(self, *sets: str) -> config.Config:
        cfg = self.config(*sets)
        if not (cfg.data.prepared_dir / data.MANIFEST).exists():
            data.prepare(cfg.data)
        return cfg

    def train_and_evaluate(self, *sets: str, progress: bool = False) -> dict[str, Any]:
        cfg = self.config(*sets)
        t0 = time.perf_counter()
        run = trainer.train(cfg, "overwrite", progress=progress)  # a measurement always trains afresh
        t1 = time.perf_counter()
        out = evaluate.evaluate(cfg, run)
        out["train_seconds"] = run.status().get("elapsed_s")
        out["train_steps"] = run.status().get("steps")
        out["train_wall_seconds"] = t1 - t0
        out["eval_seconds"] = time.perf_counter() - t1
        out["run_dir"] = str(run.path)
        return out

    def step_seconds(self, *sets: str, reps: int = 3) -> tuple[float, float]:
        """Seconds per training step during the E-step warm-up and at steady state (median)."""
        cfg = self.config(*sets)
        split = data.load_split(cfg.data.prepared_dir, "train")
        torch.manual_seed(0)
        method = trainer.build_method(cfg, split.manifest)
        b = min(cfg.train.batch_size, len(split))
        idx = torch.arange(b)

        def timed(step: int) -> float:
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                method.train_step(step, idx, split.x[idx])
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[len(ts) // 2]

        method.train_step(0, idx, split.x[idx])  # first-call overheads
        warm = timed(0) if cfg.train.method == "diffusion" else None
        steady = timed(STEADY)
        return (warm if warm is not None else steady), steady

    def steps_for_budget(self, budget_s: float, *sets: str, margin: float = STEP_MARGIN) -> int:
        """``train.steps`` for a run capped at ``budget_s`` of training time.

        ``margin`` times the steps that a calibration says fill the budget: on a shared machine the
        speed drifts, and the budget (``train.time_budget_s``), not the step count, must end every
        run so that runs get equal wall-clock. The cosine schedule then ends at about 1/margin of
        its course (the learning rate at ~75 % of its start) instead of at its floor.
        """
        cfg = self.config(*sets)
        warm_s, steady_s = self.step_seconds(*sets)
        n_warm = cfg.em.warmup_steps if cfg.train.method == "diffusion" else 0
        if budget_s <= n_warm * warm_s:
            steps = budget_s / warm_s
        else:
            steps = n_warm + (budget_s - n_warm * warm_s) / steady_s
        return max(10, int(margin * steps))


def fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{nd}g}"
    return str(v)


def table(rows: list[dict[str, Any]], cols: list[str], nd: int = 4) -> str:
    """A Markdown table (also readable as plain text)."""
    head = "| " + " | ".join(cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    body = ["| " + " | ".join(fmt(r.get(c, ""), nd) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])
