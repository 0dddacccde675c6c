"""The ``diffenc`` command: the one way people, scripts and DVC stages start work.

Each command takes ``--params FILE`` and repeated ``--set key=value``; a user mistake prints one
clear message and exits with status 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from diffenc_core import config as config_mod
from diffenc_core.errors import DiffencError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err_console = Console(stderr=True)
console = Console()

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.beta=0.5")
]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DiffencError into one red line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DiffencError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def load_config(params: Path, sets: list[str] | None) -> config_mod.Config:
    """params.yaml (if present, else the built-in defaults) plus overrides."""
    if not params.exists() and params == Path("params.yaml"):
        return config_mod.load(None, sets)
    return config_mod.load(params, sets)


def setup_torch(cfg: config_mod.Config) -> None:
    """Thread count from the config (0 = torch's default)."""
    import torch

    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads or ""))


@app.command()
@user_errors
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Prepare a dataset into data/prepared/<name>/ (Parquet splits + manifest)."""
    from flows.entry import prepare_entry

    cfg = load_config(params, set_)
    out = prepare_entry(cfg)
    console.print(f"prepared [bold]{out}[/]")


@app.command()
@user_errors
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Train the diffusion encoder (EM) or the VAE baseline into runs/<run>/."""
    from flows.entry import train_entry

    cfg = load_config(params, set_)
    out = train_entry(cfg, resume=resume, progress=progress)
    console.print(f"trained [bold]{out}[/]")


@app.command()
@user_errors
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    run: Annotated[Path | None, typer.Option(help="run directory (default: runs_dir/run from the config)")] = None,
) -> None:
    """Evaluate a trained run: metrics.json, recon/latents Parquet and plots."""
    from flows.entry import evaluate_entry

    cfg = load_config(params, set_)
    out = evaluate_entry(cfg, run)
    print_metrics(out)


def print_metrics(metrics: dict[str, Any]) -> None:
    """The scalar metrics as a two-column table."""
    from rich.table import Table

    table = Table("metric", "value")
    for key, value in metrics.items():
        if isinstance(value, int | float | str):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command("config")
@user_errors
def show_config(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Print the fully resolved configuration."""
    cfg = load_config(params, set_)
    sys.stdout.write(config_mod.dump(cfg))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
