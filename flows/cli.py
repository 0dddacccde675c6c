"""The ``diffenc`` command: the one way people, scripts and DVC stages start work.

Each command takes ``--params FILE`` and repeated ``--set key=value``; a user mistake prints one
clear message and exits with status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from diffenc_core import config as config_mod
from diffenc_core.errors import USER_ERROR_EXIT, DiffencError, JobError, PeerStopped, signal_exit
from flows import dispatch
from flows.serve import LIMIT_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err_console = Console(stderr=True)
console = Console(soft_wrap=True)  # a long run path stays one line in a log file (not cut at 80 columns)

LOGGERS = ("diffenc_core", "flows")
"""The library's and the fronts' loggers: their INFO records ("resuming vae from step 20") are CLI output."""

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override, e.g. --set train.beta=0.5")
]


class _Lines(logging.Handler):
    """A log record as one plain line, like the rest of the CLI's output: INFO on stdout, warnings and
    errors on stderr (``warning: …``); no time stamps or levels."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                label = record.levelname.lower()
                err_console.print(f"[bold yellow]{label}:[/] {escape(text)}", highlight=False, soft_wrap=True)
            else:
                console.print(text, markup=False, highlight=False)
        except Exception:
            self.handleError(record)


@app.callback()
def _show_logs() -> None:
    # before every command (once per process): the LOGGERS' records on the terminal; through Prefect, not
    # a second time in Prefect's format (its console handler sits on the root logger)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Lines) for h in logger.handlers):
            logger.addHandler(_Lines())
        logger.setLevel(logging.INFO)
        logger.propagate = not dispatch.use_prefect()


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DiffencError into one red line on stderr and exit status 2 (a failed job of several
    processes: one line, its own status; a process that stops because another failed: no line)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeerStopped as stopped:  # another process of the job reports what happened
            raise typer.Exit(stopped.exit_code) from None
        except (DiffencError, JobError) as err:
            code = USER_ERROR_EXIT if isinstance(err, DiffencError) else err.exit_code
            say_error("error", err)
            raise typer.Exit(code) from None

    return wrapper


def say_error(label: str, err: BaseException, agreed: bool = False) -> None:
    """``label: message`` on stderr, in a rank of a torchrun job only where that rank reports it
    (:func:`diffenc_core.distributed.should_print`; ``agreed``: every rank stopped the same way)."""
    from rich.markup import escape

    text = str(err)
    if _in_job():
        from diffenc_core import distributed

        if not agreed:
            distributed.record(err)
        if not distributed.should_print(err, agreed):
            return
        text = distributed.message(err)
    color = "yellow" if agreed else "red"
    err_console.print(f"[bold {color}]{label}:[/] {escape(text)}", highlight=False, soft_wrap=True)


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
    cfg = load_config(params, set_)
    out = dispatch.call("prepare", cfg)
    console.print(f"prepared [bold]{out}[/]")


@app.command()
@user_errors
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run from its last checkpoint (starts it if there is none)")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the run: every file of the old one is removed")] = False,
    progress: Annotated[bool, typer.Option(help="a progress line every train.log_every steps")] = True,
    live: Annotated[
        Path | None, typer.Option(help="also log every logged step with dvclive into this folder (DVC plots)")
    ] = None,
    nproc: Annotated[
        int | None, typer.Option(help="data-parallel processes on this machine (torch.distributed; train.nproc)")
    ] = None,
) -> None:
    """Train the diffusion encoder (EM) or the VAE baseline into runs/<run>/ (train.run, default the method).

    A folder that already holds a run is refused unless --resume or --overwrite says what to do.
    SIGTERM/SIGINT: the current step ends, checkpoints/last.pt is written, exit 143/130.
    --nproc N trains with N processes (also: torchrun --nproc-per-node N -m flows.cli train ...).
    """
    from diffenc_core import runstart
    from diffenc_core.interrupt import Interrupted
    from diffenc_core.trainer import StopTraining

    cfg = load_config(params, [*(set_ or []), *([f"train.nproc={nproc}"] if nproc is not None else [])])
    runstart.mode(resume, overwrite)  # both flags: refused before anything runs
    kwargs: dict[str, Any] = {"resume": resume, "overwrite": overwrite, "progress": progress}
    if live is not None:
        kwargs["live_dir"] = str(live)
    if not dispatch.use_prefect():  # a flow run handles signals in its task
        kwargs["stop_signals"] = True
    try:
        out = dispatch.call("train", cfg, **kwargs)
    except Interrupted as stop:
        say_error("interrupted", stop, agreed=True)
        raise typer.Exit(stop.exit_code) from None
    except KeyboardInterrupt:  # a second signal: stopped at once, its last periodic checkpoint kept
        say_error("interrupted", KeyboardInterrupt("stopped at once; `diffenc train --resume` continues from the "
                                                   "last periodic checkpoint"), agreed=True)
        raise typer.Exit(signal_exit(signal.SIGINT)) from None
    except StopTraining:  # a rank of `diffenc train --nproc` asked to stop: its launcher reports it
        raise typer.Exit(0) from None
    if not _in_job() or _reports(None):
        console.print(f"trained [bold]{out}[/]")


def _in_job() -> bool:
    """Whether this process is a rank of a torchrun job: ``distributed.launched()`` without importing torch,
    so a user mistake is reported before the slow import."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _reports(err: BaseException | None) -> bool:
    from diffenc_core import distributed

    return distributed.should_print(err, agreed=True)


@app.command()
@user_errors
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    run: Annotated[Path | None, typer.Option(help="run directory (default: runs_dir/run from the config)")] = None,
) -> None:
    """Evaluate a trained run: metrics.json, recon/latents Parquet and plots."""
    cfg = load_config(params, set_)
    out = dispatch.call("evaluate", cfg, run_dir=run)
    print_metrics(out)


def print_metrics(metrics: dict[str, Any]) -> None:
    """The scalar metrics as a two-column table."""
    from rich.table import Table

    table = Table("metric", "value")
    for key, value in metrics.items():
        if isinstance(value, int | float | str):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
@user_errors
def compare(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    runs_dir: Annotated[Path | None, typer.Option(help="runs folder (default: train.runs_dir)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="folder for the comparison table and plot (default: <runs_dir>/comparison)")
    ] = None,
    run: Annotated[
        list[Path] | None, typer.Option("--run", help="compare exactly these run directories (repeatable)")
    ] = None,
) -> None:
    """Side-by-side table of evaluated runs (diffusion encoder vs VAE) and a rate–distortion plot."""
    from flows.compare import compare_entry

    cfg = load_config(params, set_)
    compare_entry(cfg, runs_dir=runs_dir, out=out, run_dirs=run or None)


tune_app = typer.Typer(help="Optuna tuning: run or resume a study, or show its best trials.")
app.add_typer(tune_app, name="tune")


@tune_app.callback(invoke_without_command=True)
@user_errors
def tune(
    ctx: typer.Context,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    study: Annotated[str | None, typer.Option(help="study name (default: tune.study)")] = None,
    storage: Annotated[str | None, typer.Option(help="storage URL or journal file (default: tune.storage)")] = None,
    n_trials: Annotated[int | None, typer.Option(help="target number of finished trials")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes on this machine")] = None,
) -> None:
    """Run (or resume) a study until it has its target number of finished trials."""
    if ctx.invoked_subcommand is not None:
        return
    from flows.tuning import run_study

    cfg = load_config(params, set_)
    with worker_deaths():
        run_study(cfg, study=study, storage=storage, n_trials=n_trials, workers=workers)


@tune_app.command("resume")
@user_errors
def tune_resume(
    params: Annotated[Path, typer.Option("--params", "-p", help="params.yaml, only to find the default storage")]
    = Path("params.yaml"),
    study: Annotated[str | None, typer.Option(help="study name (default: tune.study)")] = None,
    storage: Annotated[str | None, typer.Option(help="storage URL or journal file")] = None,
    n_trials: Annotated[int | None, typer.Option(help="a larger target extends the study")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes on this machine")] = None,
) -> None:
    """Continue a study with the settings it stored: configuration, search space, objective, target."""
    from flows.tuning import resume_study

    cfg = load_config(params, None)
    with worker_deaths():
        resume_study(cfg, study=study, storage=storage, n_trials=n_trials, workers=workers)


@contextlib.contextmanager
def worker_deaths() -> Iterator[None]:
    """A tuning worker that died: one line on stderr and its own exit status (not a user mistake)."""
    from rich.markup import escape

    from flows.tuning import WorkerDied

    try:
        yield
    except WorkerDied as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code) from None


@tune_app.command("show")
@user_errors
def tune_show(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    study: Annotated[str | None, typer.Option(help="study name (default: tune.study)")] = None,
    storage: Annotated[str | None, typer.Option(help="storage URL or journal file")] = None,
    export: Annotated[Path | None, typer.Option(help="write the best parameters as a params file")] = None,
    trial: Annotated[int | None, typer.Option(help="export this trial instead of the best one")] = None,
) -> None:
    """Best trial(s) or the Pareto front as a table; optionally export the best params."""
    from flows.tuning import show_study

    cfg = load_config(params, set_)
    show_study(cfg, study=study, storage=storage, export=export, trial=trial)


@app.command()
@user_errors
def serve(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    limit: Annotated[int | None, typer.Option(help=LIMIT_HELP)] = None,
    work_pool: Annotated[
        str | None, typer.Option(help="register the deployments on this process work pool instead of serving")
    ] = None,
) -> None:
    """Serve every Prefect deployment (needs a Prefect server: see the README)."""
    from flows.serve import main as serve_main

    code = serve_main(params=params, sets=set_ or [], limit=limit, work_pool=work_pool)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def dashboard(
    runs_dir: Annotated[Path, typer.Option(help="runs folder to show")] = Path("runs"),
    storage: Annotated[str | None, typer.Option(help="Optuna storage to show")] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8501,
) -> None:
    """Open the Streamlit dashboard over a runs folder."""
    from dashboard.launch import main as dashboard_main

    code = dashboard_main(runs_dir=runs_dir, storage=storage, host=host, port=port)
    if code:
        raise typer.Exit(code)


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
