"""Prefect 3 flows: data preparation, EM training, tuning, evaluation, a pipeline and a β sweep.

Thin on purpose: each task calls the one implementation in :mod:`flows.entry` and passes paths
(prepared-data folders, run directories), never tensors. Every flow

- takes the configuration as parameters: ``overrides`` (dotted keys ``{"train.beta": 0.5}``
  and/or nested sections ``{"train": {"beta": 0.5}}``) applied on top of ``params_file`` +
  ``sets`` (what ``diffenc serve`` was started with), validated with ``diffenc_core.config``
  *before any work*: a bad value ends the flow ``Failed`` with the configuration error in its
  logs, and nothing is written;
- retries tasks only on transient errors (I/O, a locked database), never on a user mistake
  (``DiffencError``: bad config, bad data, divergence);
- reports training progress in the flow-run logs, with the library's own log lines
  (:func:`library_logs`);
- publishes a markdown artifact with the final metrics and the run directory.

``FLOWS[name](config=cfg, **kwargs)`` is how :mod:`flows.dispatch` runs the CLI's ``prepare`` /
``train`` / ``evaluate`` as flow runs when ``PREFECT_API_URL`` is set: a ``Config`` validated in this
process is passed as it is (``config``), never turned into a dict and validated again.

Fan-out (``beta_sweep``, ``tune(fan_out=N)``) creates one flow run per β / tuning worker from a
*deployment* (``run_deployment``), so each runs in its own process on whichever ``diffenc serve``
process or ``prefect worker`` picks it up. Trainings are never run in parallel threads of one
process: the trainer's resumable RNG state is the process-global torch RNG.
"""

from __future__ import annotations

from flows import prefect_env

prefect_env.apply_defaults()

import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import MissingContextError  # noqa: E402

from diffenc_core import config as config_mod  # noqa: E402  (light: pydantic + yaml)
from diffenc_core.config import Config  # noqa: E402
from diffenc_core.errors import ConfigError, DiffencError  # noqa: E402

# torch, pandas and the entry points are imported inside the tasks, after the parameters are
# validated: a flow run with a bad parameter fails in seconds, and importing this module (every
# flow run's process does) stays cheap.

DEPLOYMENT = "default"
"""The deployment name every flow is served (or deployed to a work pool) under."""

Method = Literal["diffusion", "vae"]

PARAMS_SUFFIXES = (".yaml", ".yml")
"""What a flow's ``params_file`` parameter may name: a flow run reads no other file of the server."""


# ------------------------------------------------------------------------------ configuration
def resolve_config(
    overrides: dict[str, Any] | None = None,
    params_file: str | None = None,
    sets: list[str] | None = None,
) -> Config:
    """``params_file`` + ``sets`` (the served defaults), then ``overrides`` (dotted keys or nested
    sections, merged section by section: :func:`diffenc_core.config.set_dotted`); validated once.

    Raises ConfigError naming the bad key or value; reads nothing but ``params_file``.
    """
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"parameters: 'overrides' must be a mapping, got {type(overrides).__name__}")
    if params_file is not None and Path(params_file).suffix.lower() not in PARAMS_SUFFIXES:
        raise ConfigError(f"parameters: params_file: {params_file} is not a YAML params file (.yaml or .yml)")
    return config_mod.resolve(params_file, ("--set {key}", config_mod.parse_overrides(sets)),
                              ("parameters", overrides or {}))


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run logger (its lines go to the Prefect UI), or a plain logger outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _config(overrides: dict[str, Any] | None, params_file: str | None, sets: list[str] | None,
            config: Config | None = None, extra: dict[str, Any] | None = None) -> Config:
    """Validate the parameters first thing in a flow: a bad one fails the run, writing nothing.

    ``config``: a configuration validated by the caller in this process (the CLI, a parent flow), used as
    it is; a deployment's parameters come as ``overrides`` on the served ``params_file`` and ``sets``.
    ``extra``: dotted keys a flow parameter of its own sets (``nproc``).
    """
    log = _logger()
    try:
        if config is not None:
            if overrides or params_file or sets:
                raise ConfigError("parameters: give 'config' alone, or 'overrides' (with params_file/sets)")
            cfg = config_mod.with_overrides(config, extra) if extra else config
        else:
            if extra and (overrides is None or isinstance(overrides, dict)):
                overrides = {**(overrides or {}), **extra}
            cfg = resolve_config(overrides, params_file, sets)
    except ConfigError as err:
        log.error("invalid parameters, nothing was run: %s", err)
        raise
    log.info(
        "configuration: dataset=%s method=%s run=%s beta=%g steps=%d runs_dir=%s",
        cfg.data.dataset, cfg.train.method, cfg.train.run_name, cfg.train.beta, cfg.train.steps,
        cfg.train.runs_dir,
    )
    return cfg


LIBRARY_LOGGERS = ("diffenc_core", "flows")
"""Loggers whose INFO records (``resuming vae from step 20``, ``replacing runs/vae …``) belong in the run's logs."""


class _RunIds(logging.Filter):
    """Stamps a record with the task run it belongs to, so Prefect's API handler can file it from any thread."""

    def __init__(self, flow_run_id: Any, task_run_id: Any):
        super().__init__()
        self.ids = {"flow_run_id": flow_run_id, "task_run_id": task_run_id}

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.ids.items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


@contextlib.contextmanager
def library_logs() -> Iterator[None]:
    """While a task runs, the records of :data:`LIBRARY_LOGGERS` from INFO up go to its flow-run log too
    (as ``PREFECT_LOGGING_EXTRA_LOGGERS`` would, when set before Prefect is imported)."""
    from prefect.context import TaskRunContext
    from prefect.logging.handlers import APILogHandler

    ctx = TaskRunContext.get()
    handler = APILogHandler()
    if ctx is not None:
        handler.addFilter(_RunIds(ctx.task_run.flow_run_id, ctx.task_run.id))
    changed: list[tuple[logging.Logger, int]] = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if any(isinstance(h, APILogHandler) for h in logger.handlers):
            continue  # extra loggers of Prefect's own configuration: already sent
        logger.addHandler(handler)
        changed.append((logger, logger.level))
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in changed:
            logger.removeHandler(handler)
            logger.setLevel(level)


# ---------------------------------------------------------------------------------- retrying
def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: I/O and connection errors, a locked or unreachable database.

    Never a user mistake (DiffencError: config, data, checkpoint, divergence) nor a bug.
    """
    if exc is None or isinstance(exc, DiffencError):
        return False
    if isinstance(exc, OSError):  # includes ConnectionError, TimeoutError, a full or flaky disk
        return True
    return type(exc).__name__ in {"OperationalError", "StorageInternalError"}


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    retry = is_transient(exc)
    if exc is not None and not retry:
        _logger().info("not retrying %s: %s is not transient", task_run.name, type(exc).__name__)
    return retry


TASK_OPTIONS: dict[str, Any] = dict(
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,  # a task re-run must redo its work (or resume), never replay a result
    persist_result=False,  # results are run directories on disk, not pickles under PREFECT_HOME
)


# --------------------------------------------------------------------------------- reporting
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float | str | bool) or value is None


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per metric, one column per run (or a single ``value`` column)."""
    keys: list[str] = []
    for metrics in columns.values():
        keys += [k for k, v in metrics.items() if _scalar(v) and k not in keys]
    names = list(columns)
    lines = ["| metric | " + " | ".join(_fmt(n) for n in names) + " |", "| --- |" + " --- |" * len(names)]
    for key in keys:
        cells = [_fmt(columns[n][key]) if key in columns[n] else "" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def artifact_key(kind: str, name: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"diffenc-{kind}-{name}".lower()).strip("-")
    return slug[:100] or "diffenc"


def publish(kind: str, name: str, title: str, columns: dict[str, dict[str, Any]],
            run_dirs: dict[str, Any] | None = None) -> str:
    """Publish the final metrics (and run directories) as a markdown artifact; return the text."""
    lines = [f"# {title}", ""]
    for label, path in (run_dirs or {}).items():
        lines.append(f"- {label}: `{Path(path).resolve()}`" if path else f"- {label}: (none)")
    lines += ["", metrics_table(columns) if columns else "_no metrics_"]
    text = "\n".join(lines) + "\n"
    try:
        create_markdown_artifact(text, key=artifact_key(kind, name), description=title)
    except Exception as err:  # the results are on disk already; a UI hiccup must not fail the run
        _logger().warning("could not publish the %s artifact: %s", kind, err)
    return text


def train_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's status and its last logged (training + validation) numbers."""
    from diffenc_core import runs

    run = runs.Run(Path(run_dir))
    status = run.status()
    out: dict[str, Any] = {k: status.get(k) for k in ("state", "method", "steps", "elapsed_s", "resumed_from")}
    history = run.history()
    if history is not None and len(history):
        for key, value in history.iloc[-1].items():
            if isinstance(value, int | float) and math.isfinite(float(value)):
                out[key] = float(value)
        val = history.dropna(subset=["val_neg_elbo"]) if "val_neg_elbo" in history else None
        if val is not None and len(val):
            out["best_val_neg_elbo"] = float(val["val_neg_elbo"].min())
    return out


# ------------------------------------------------------------------------------------- tasks
@task(name="prepare-data", **TASK_OPTIONS)
def prepare_task(cfg: Config) -> Path:
    from diffenc_core import data
    from flows import entry

    with library_logs():
        out = entry.prepare_entry(cfg)
    manifest = data.read_manifest(out)
    _logger().info("prepared %s: %s", out, manifest.get("sizes"))
    return out


def inside_runs_dir(cfg: Config, path: str | Path, name: str) -> Path:
    """``path`` (a flow parameter) if it lies inside ``train.runs_dir``, else a ConfigError naming it:
    a flow run, whose parameters anyone who reaches the server can set, writes nowhere else."""
    root = Path(cfg.train.runs_dir).resolve()
    resolved = Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"parameters: {name}: {path} lies outside train.runs_dir ({cfg.train.runs_dir})")
    return Path(path)


@task(name="train-model", **TASK_OPTIONS)
def train_task(cfg: Config, resume: bool = True, progress: bool = False, live_dir: str | None = None,
               overwrite: bool = False) -> Path:
    """Train: a new run, or resume / overwrite it as asked, exactly like ``diffenc train`` (one
    implementation: :mod:`diffenc_core.runstart`); a retry always resumes what the try began."""
    from prefect.runtime import task_run

    from flows import entry

    log = _logger()
    if task_run.run_count > 1:
        resume, overwrite = True, False
    total, name = cfg.total_steps, cfg.train.run_name
    shown = ("loss_encoder", "loss_vae", "recon_nll", "sync_gap", "accept", "val_neg_elbo", "val_mse")

    def on_log(step: int, row: dict[str, float]) -> None:
        info = " ".join(f"{k}={row[k]:.4g}" for k in shown if k in row)
        log.info("%s step %d/%d (%.0f%%) %s", name, step, total, 100 * step / total, info)

    with library_logs():
        return entry.train_entry(cfg, resume=resume, overwrite=overwrite, progress=progress, on_log=on_log,
                                 live_dir=live_dir, stop_signals=True)


@task(name="evaluate-run", **TASK_OPTIONS)
def evaluate_task(cfg: Config, run_dir: str | Path | None = None) -> dict[str, Any]:
    from flows import entry

    with library_logs():
        metrics = entry.evaluate_entry(cfg, run_dir)
    _logger().info("evaluated %s: neg_elbo_nats=%s mse_refined=%s", run_dir or cfg.train.run_name,
                   metrics.get("neg_elbo_nats"), metrics.get("mse_refined"))
    return metrics


@task(name="run-study", **TASK_OPTIONS)
def tune_task(cfg: Config, study: str | None, storage: str | None, n_trials: int | None,
              workers: int | None) -> Any:
    from flows.tuning import run_study  # written alongside; imported only when a study runs

    with library_logs():
        return run_study(cfg, study=study, storage=storage, n_trials=n_trials, workers=workers)


@task(name="launch-deployment")
def launch_task(deployment: str, parameters: dict[str, Any], flow_run_name: str) -> dict[str, Any]:
    """Create a flow run of ``deployment`` and wait for it: it runs in its own process on whichever
    serve process / worker polls that deployment. Returns its id, name and final state."""
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters=parameters, flow_run_name=flow_run_name, poll_interval=2)
    state = fr.state
    return {"id": str(fr.id), "name": fr.name, "state": state.type.value if state else "UNKNOWN",
            "message": state.message if state else None}


def _ensure_data(cfg: Config) -> None:
    from diffenc_core import data

    if data.is_prepared(cfg.data):
        return
    _logger().info("%s is not prepared (or was prepared differently): preparing it", cfg.data.prepared_dir)
    prepare_task(cfg)


# ------------------------------------------------------------------------------------- flows
@flow(name="diffenc-prepare", description="Prepare a dataset into data/prepared/<name>/.")
def prepare(overrides: dict[str, Any] | None = None, params_file: str | None = None,
            sets: list[str] | None = None, config: Config | None = None) -> Path:
    cfg = _config(overrides, params_file, sets, config)
    out = prepare_task(cfg)
    from diffenc_core import data

    manifest = data.read_manifest(out)
    sizes = {f"{k}_examples": v for k, v in manifest.get("sizes", {}).items()}
    publish("prepare", cfg.data.name, f"Prepared {cfg.data.name}",
            {"value": {"dataset": cfg.data.dataset, "x_dim": manifest.get("x_dim"), **sizes}},
            {"prepared data": out})
    return out


@flow(name="diffenc-train", description="Train the diffusion encoder (EM) or the VAE baseline into runs/<run>/. "
      "Re-running it continues a killed run from its last checkpoint; overwrite=true replaces a run.")
def train(overrides: dict[str, Any] | None = None, resume: bool = True, progress: bool = False,
          params_file: str | None = None, sets: list[str] | None = None, live_dir: str | None = None,
          overwrite: bool = False, nproc: int | None = None, config: Config | None = None) -> Path:
    """Like ``diffenc train``: ``resume=True`` (the default) continues the run from
    ``checkpoints/last.pt`` (the budget may grow; other changed settings are refused, naming them)
    or starts it when there is none; ``resume=False`` starts a new run and refuses a folder that
    holds one; ``overwrite=True`` replaces the run (``resume`` is then ignored). ``live_dir`` must
    lie inside ``train.runs_dir``. ``nproc`` (``train.nproc``): data-parallel processes on the
    machine that runs the flow (torch.distributed). ``config``: a validated configuration instead of
    ``overrides`` (callers in this process: the CLI, the pipeline)."""
    cfg = _config(overrides, params_file, sets, config, {"train.nproc": nproc} if nproc is not None else None)
    if overwrite:
        resume = False
    if live_dir is not None:
        inside_runs_dir(cfg, live_dir, "live_dir")
    from diffenc_core import runstart

    runstart.plan(cfg, runstart.mode(resume, overwrite))  # a refusal fails the flow before any work
    _ensure_data(cfg)
    run_dir = train_task(cfg, resume=resume, progress=progress, live_dir=live_dir, overwrite=overwrite)
    publish("train", cfg.train.run_name, f"Training {cfg.train.run_name} ({cfg.train.method})",
            {"value": train_summary(run_dir)}, {"run directory": run_dir})
    return run_dir


@flow(name="diffenc-evaluate", description="Evaluate a trained run: metrics.json, Parquet tables, plots.")
def evaluate(overrides: dict[str, Any] | None = None, run_dir: Path | None = None,
             params_file: str | None = None, sets: list[str] | None = None,
             config: Config | None = None) -> dict[str, Any]:
    """``run_dir`` defaults to ``<train.runs_dir>/<train.run>`` and must lie inside ``train.runs_dir``."""
    cfg = _config(overrides, params_file, sets, config)
    from diffenc_core import runs

    if run_dir is not None:
        inside_runs_dir(cfg, run_dir, "run_dir")
    run = runs.open_run(run_dir if run_dir is not None else Path(cfg.train.runs_dir) / cfg.train.run_name)
    metrics = evaluate_task(cfg, run.path)
    publish("evaluate", run.name, f"Evaluation of {run.name}", {"value": metrics}, {"run directory": run.path})
    return metrics


def _study_summary(result: Any) -> dict[str, Any]:
    """Flatten ``run_study``'s summary (counts, best trial or Pareto front) into one table column."""
    if not isinstance(result, dict):
        return {"result": repr(result)[:200]}
    out: dict[str, Any] = {k: result.get(k) for k in ("study", "storage", "objective")}
    out |= {f"trials {k}": v for k, v in (result.get("counts") or {}).items()}
    metrics = result.get("metrics") or []
    rows = result.get("best") or result.get("pareto_front") or []
    for i, row in enumerate(rows[:5]):
        tag = "best" if "best" in result else f"pareto #{i}"
        out[f"{tag} trial"] = row.get("number")
        for j, value in enumerate(row.get("values") or []):
            out[f"{tag} {metrics[j] if j < len(metrics) else f'value {j}'}"] = value
        out |= {f"{tag} {k}": v for k, v in (row.get("params") or {}).items()}
        out[f"{tag} run"] = row.get("run_path")
    return out


@flow(name="diffenc-tune", description="Run (or resume) an Optuna study; fan_out>1 runs that many "
      "copies of this deployment as parallel study workers (shared storage).")
def tune(overrides: dict[str, Any] | None = None, study: str | None = None, storage: str | None = None,
         n_trials: int | None = None, workers: int | None = None, fan_out: int = 1,
         deployment: str = f"diffenc-tune/{DEPLOYMENT}",
         params_file: str | None = None, sets: list[str] | None = None,
         config: Config | None = None) -> dict[str, Any]:
    """Given only ``study`` (no ``overrides`` or ``config``) and the study exists, it continues with the
    settings it stored (configuration, search space, objective, target), like ``diffenc tune resume``."""
    cfg = _config(overrides, params_file, sets, config)
    if fan_out < 1:
        raise ConfigError(f"parameters: fan_out must be >= 1 (got {fan_out})")
    name = study or cfg.tune.study
    if not overrides and config is None:
        from flows.tuning import stored_study

        settings = stored_study(cfg, study, storage)
        if settings is not None:
            cfg, n_trials = settings.config, n_trials if n_trials is not None else settings.n_trials
            _logger().info("study %s exists: resuming it with its stored settings (target %d finished trials)",
                           name, n_trials)
    workers_note: dict[str, str] = {}
    if fan_out > 1:
        cfg = _absolute_paths(cfg)
        _ensure_data(cfg)
        params = {"overrides": cfg.to_dict(), "study": study, "storage": storage, "n_trials": n_trials,
                  "workers": workers, "fan_out": 1}
        futures = [launch_task.submit(deployment, params, f"{name}-worker-{i}") for i in range(fan_out)]
        for child in (f.result() for f in futures):
            workers_note[f"worker {child['name']}"] = child["state"]
            if child["state"] != "COMPLETED":
                _logger().warning("tuning worker %s ended %s: %s (finishing the study here)",
                                  child["name"], child["state"], child["message"])
        workers = 1  # below: summarise the study, running here only what the workers left undone
    else:
        _ensure_data(cfg)
    result = tune_task(cfg, study, storage, n_trials, workers)
    summary = {**workers_note, **_study_summary(result)}
    best_run = next((v for k, v in summary.items() if k.endswith(" run") and v), None)
    title = f"Study {name}" + (f" ({fan_out} parallel workers)" if fan_out > 1 else "")
    publish("tune", name, title, {"value": summary}, {"best trial's run": best_run})
    return summary


def _absolute_paths(cfg: Config) -> Config:
    """Fan-out children may run in another working folder (a worker's project checkout): send them
    absolute data and runs folders, the ones this flow reads their results back from."""
    return config_mod.with_overrides(cfg, {"data.root": str(Path(cfg.data.root).resolve()),
                                           "train.runs_dir": str(Path(cfg.train.runs_dir).resolve())})


def _method_cfg(cfg: Config, method: str, several: bool) -> Config:
    run = cfg.train.run
    name = (f"{run}-{method}" if several else run) if run else method
    if (method, name) == (cfg.train.method, cfg.train.run):
        return cfg
    return config_mod.with_overrides(cfg, {"train.method": method, "train.run": name})


@flow(name="diffenc-pipeline", description="prepare → train → evaluate, for each method (side by side).")
def pipeline(overrides: dict[str, Any] | None = None, methods: list[Method] | None = None,
             resume: bool = True, params_file: str | None = None,
             sets: list[str] | None = None, overwrite: bool = False,
             config: Config | None = None) -> dict[str, dict[str, Any]]:
    """``methods`` defaults to ``[train.method]``; with several, runs are named ``<run>-<method>``,
    and without ``train.run`` simply ``<method>``. Each run is resumed (``resume=True``, the
    default: a finished run with the same settings is only re-evaluated, other settings are
    refused), started new (``resume=False``: refused if it exists) or replaced (``overwrite``)."""
    cfg = _config(overrides, params_file, sets, config)
    methods = list(dict.fromkeys(methods or [cfg.train.method]))
    per_method = {m: _method_cfg(cfg, m, len(methods) > 1) for m in methods}  # validated up front
    from diffenc_core import runstart

    for mcfg in per_method.values():  # a run that would be refused stops the pipeline before any work
        runstart.plan(mcfg, runstart.mode(resume and not overwrite, overwrite))
    _ensure_data(cfg)
    results: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, Path] = {}
    for method, mcfg in per_method.items():
        run_dirs[method] = train(config=mcfg, resume=resume, overwrite=overwrite)
        results[mcfg.train.run_name] = evaluate(config=mcfg, run_dir=str(run_dirs[method]))
    publish("pipeline", "-".join(r.name for r in map(Path, run_dirs.values())),
            "Pipeline: " + ", ".join(methods), results, {f"{m} run": d for m, d in run_dirs.items()})
    return results


@flow(name="diffenc-beta-sweep", description="One pipeline (train + evaluate) per β, fanned out as "
      "separate flow runs of the pipeline deployment over every serve process / worker.")
def beta_sweep(overrides: dict[str, Any] | None = None, betas: list[float] | None = None,
               method: Method | None = None, via: Literal["deployment", "inline"] = "deployment",
               deployment: str = f"diffenc-pipeline/{DEPLOYMENT}", resume: bool = True,
               params_file: str | None = None, sets: list[str] | None = None,
               overwrite: bool = False, config: Config | None = None) -> dict[str, dict[str, Any]]:
    """``via="deployment"`` runs each β as its own flow run of ``deployment`` (in parallel, on any
    process serving it: several ``diffenc serve`` processes or ``prefect worker start`` on a work
    pool); ``via="inline"`` runs them one after another in this process (no deployment needed).
    Runs are named ``<run or method>-beta<β>`` and resumed, started or replaced as ``resume`` /
    ``overwrite`` say (as for the pipeline); results are read back from their run directories,
    so every worker must see the same ``train.runs_dir`` (shared disk)."""
    cfg = _config(overrides, params_file, sets, config)
    if via == "deployment":
        cfg = _absolute_paths(cfg)
    betas = list(dict.fromkeys(betas or [0.25, 1.0, 4.0]))
    method = method or cfg.train.method
    base = cfg.train.run or method
    sweep = {b: config_mod.with_overrides(cfg, {"train.method": method, "train.beta": b,
                                                "train.run": f"{base}-beta{b:g}"}) for b in betas}
    _ensure_data(cfg)
    failed: list[str] = []
    if via == "deployment":
        futures = {b: launch_task.submit(deployment, {"overrides": c.to_dict(), "methods": [method],
                                                      "resume": resume, "overwrite": overwrite},
                                      f"{base}-beta{b:g}")
                   for b, c in sweep.items()}
        for b, fut in futures.items():
            child = fut.result()
            _logger().info("β=%g: flow run %s ended %s", b, child["name"], child["state"])
            if child["state"] != "COMPLETED":
                failed.append(f"β={b:g} ({child['name']}: {child['state']} {child['message'] or ''})")
    else:
        for c in sweep.values():
            pipeline(config=c, methods=[method], resume=resume, overwrite=overwrite)
    from diffenc_core import runs

    columns: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, Path] = {}
    for b, c in sweep.items():
        run_dir = Path(c.train.runs_dir) / c.train.run_name
        run_dirs[f"β={b:g}"] = run_dir
        metrics = runs.Run(run_dir).metrics() if run_dir.is_dir() else {}
        columns[f"β={b:g}"] = {"state": runs.Run(run_dir).status().get("state", "missing"), **metrics}
    publish("beta-sweep", base, f"β sweep of {base}: " + ", ".join(f"{b:g}" for b in betas), columns, run_dirs)
    if failed:
        raise RuntimeError("β sweep incomplete: " + "; ".join(failed))
    return columns


FLOWS = {
    "prepare": prepare,
    "train": train,
    "evaluate": evaluate,
    "tune": tune,
    "pipeline": pipeline,
    "beta_sweep": beta_sweep,
}
"""Every flow by CLI name; ``flows.dispatch`` calls ``FLOWS[name](config=cfg, **kwargs)``."""
