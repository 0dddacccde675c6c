"""Shared helpers for the benchmark scripts: machine facts, result files, a scratch workspace."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from diffenc_core import config, data, evaluate, runs, trainer

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "commit": commit,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    runs.atomic_write_json(path, {"machine": machine(), **payload})
    return path


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

    def train_and_evaluate(self, *sets: str) -> dict[str, Any]:
        cfg = self.config(*sets)
        run = trainer.train(cfg, progress=True)
        out = evaluate.evaluate(cfg, run)
        out["train_seconds"] = run.status().get("elapsed_s")
        out["train_steps"] = run.status().get("steps")
        return out
