"""Serve every diffenc deployment (``diffenc serve`` / ``python -m flows.serve``).

Needs a Prefect API: a local server (``prefect server start --host 127.0.0.1``) with
``PREFECT_API_URL=http://127.0.0.1:4200/api``, any other Prefect server, or Prefect Cloud.
Run it from the project root: flow runs inherit its working folder, so the relative paths in
``params.yaml`` (``data/prepared``, ``runs``) mean the same as for the CLI and DVC.

Each flow of :data:`flows.prefect_flows.FLOWS` becomes the deployment ``<flow>/default`` whose
default parameters are this process's ``--params`` file and ``--set`` overrides; a flow run
adds its own ``overrides`` on top, e.g.::

    prefect deployment run 'diffenc-train/default' --param overrides='{"train.beta": 0.5}' --watch

``--work-pool NAME`` instead registers the same deployments on a Prefect *process work pool*
(created if missing) and returns; any number of ``prefect worker start --pool NAME`` processes,
on this machine or others that see the same project folder, then execute the flow runs.

SIGTERM or SIGINT stops serving within :data:`STOP_TIMEOUT_S` seconds whatever the Prefect server
does (Prefect's own shutdown talks to the server and can hang while it is stopping too): the
runner serves from a background thread, the main thread keeps the signals, and after the
timeout the flow runs still going get SIGTERM (a training checkpoints and stops) and the process
exits with 128 + the signal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flows import prefect_env

DEFAULT_PARAMS = Path("params.yaml")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_TIMEOUT_S = 5.0  # after a stop signal, Prefect's runner gets this long to stop its flow runs cleanly
POLL_S = 0.2  # how often the main thread looks at the runner and at received signals
SIGNAL_EXIT_BASE = 128  # exit status after signal N: 128 + N (130 for SIGINT, 143 for SIGTERM)


def _base(params: Path | None, sets: list[str]) -> str | None:
    """Validate the served defaults now (a bad --set fails here, not in every flow run) and
    return the params file to use (absolute), or None for the built-in defaults."""
    from diffenc_core import config as config_mod

    if params is None or (params == DEFAULT_PARAMS and not params.exists()):
        config_mod.load(None, sets)
        return None
    config_mod.load(params, sets)  # ConfigError for a missing or bad file, or a bad --set
    return str(params.resolve())


def _require_api() -> str:
    from diffenc_core.errors import DiffencError

    url = prefect_env.api_url()
    if not url:
        raise DiffencError(
            "no Prefect server configured: start one with `prefect server start --host 127.0.0.1` "
            "and `export PREFECT_API_URL=http://127.0.0.1:4200/api` (see the README, 'Prefect')"
        )
    return url


def deployments(params: Path | None = DEFAULT_PARAMS, sets: list[str] | None = None) -> list:
    """One served deployment per flow, its default parameters the served configuration."""
    from prefect.types.entrypoint import EntrypointType

    from flows.prefect_flows import DEPLOYMENT, FLOWS

    defaults = {"params_file": _base(params, list(sets or [])), "sets": list(sets or [])}
    return [
        fl.to_deployment(
            name=DEPLOYMENT,
            parameters=defaults,
            tags=["diffenc"],
            description=fl.description,
            entrypoint_type=EntrypointType.MODULE_PATH,  # importable from any working folder
        )
        for fl in FLOWS.values()
    ]


def deploy_to_pool(pool: str, params: Path | None = DEFAULT_PARAMS, sets: list[str] | None = None,
                   name: str | None = None) -> list[str]:
    """Register every flow as ``<flow>/<name>`` (default ``default``) on the process work pool
    ``pool`` (made if missing), its code loaded from this project folder (``from_source``; other
    machines need the same path, e.g. a shared disk); return the deployment names."""
    from prefect import deploy
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from flows.prefect_flows import DEPLOYMENT, FLOWS

    defaults = {"params_file": _base(params, list(sets or [])), "sets": list(sets or [])}
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
    name = name or DEPLOYMENT
    root = Path.cwd()
    deps = [
        prefect_flow.from_source(source=str(root), entrypoint=f"flows/prefect_flows.py:{fl.fn.__name__}")
        .to_deployment(name=name, parameters=defaults, tags=["diffenc"], description=fl.description)
        for fl in FLOWS.values()
    ]
    deploy(*deps, work_pool_name=pool, build=False, push=False, print_next_steps_message=False,
           ignore_warnings=True)
    return [f"{fl.name}/{name}" for fl in FLOWS.values()]


def main(params: Path = DEFAULT_PARAMS, sets: list[str] | None = None, limit: int | None = None,
         work_pool: str | None = None) -> int:
    """Serve all deployments until a stop signal (or, with ``work_pool``, register them there and
    return); returns the exit status: 0, or 128 + the signal that stopped it."""
    prefect_env.apply_defaults()
    sets = list(sets or [])
    _base(params, sets)  # a bad configuration fails before anything is registered
    url = _require_api()
    if work_pool:
        for name in deploy_to_pool(work_pool, params, sets):
            print(f"deployed {name} to work pool '{work_pool}'")
        print(f"now start workers: prefect worker start --pool {work_pool}  (one per machine or core set)")
        return 0
    deps = deployments(params, sets)
    print(f"serving {len(deps)} deployments against {url} from {Path.cwd()}", flush=True)
    return serve_until_stopped(deps, limit)


def serve_until_stopped(deps: list, limit: int | None = None) -> int:
    """Serve ``deps`` until a stop signal (0 if the runner ends by itself, else 128 + the signal).

    A runner that has not stopped :data:`STOP_TIMEOUT_S` after the signal (a server that does not
    answer) is abandoned: its flow-run processes get SIGTERM and this process exits at once.
    """
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=False, limit=limit)  # pausing schedules would ask the server too
    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            for dep in deps:
                runner.add_deployment(dep)
            asyncio.run(runner.start())
        except BaseException as err:  # handed to the main thread
            failure.append(err)
        finally:
            done.set()

    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if main_thread else {}
    try:
        threading.Thread(target=run, name="prefect-runner", daemon=True).start()
        while not received and not done.wait(POLL_S):
            pass
        if not received:
            if failure:
                raise failure[0]
            return 0
        code = SIGNAL_EXIT_BASE + received[0]
        deadline = time.monotonic() + STOP_TIMEOUT_S
        # also bounds what runs after this returns (Prefect's exit hooks flush logs to the server)
        threading.Thread(target=_abandon_at, args=(deadline, code), name="serve-stop-deadline", daemon=True).start()
        with contextlib.suppress(Exception):  # the runner may not have started: nothing to stop then
            runner.execute_in_background(runner.astop)
        while len(received) < 2 and time.monotonic() < deadline and not done.wait(POLL_S):
            pass  # a second signal stops waiting
        if not done.is_set():
            _abandon(code)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _abandon_at(deadline: float, code: int) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))
    _abandon(code)


def _abandon(code: int) -> None:
    """Exit now with ``code``: flow runs get SIGTERM, Prefect's threads (waiting on the server) are
    not joined."""
    _stop_children()
    with contextlib.suppress(Exception):
        print(f"stopped (status {code}); Prefect's shutdown did not finish in {STOP_TIMEOUT_S:g} s", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _stop_children() -> None:
    """SIGTERM every process this one started (the flow runs), without waiting for them."""
    me = os.getpid()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGTERM)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", "-p", type=Path, default=DEFAULT_PARAMS, help="params.yaml to serve with")
    parser.add_argument("--set", "-s", dest="sets", action="append", default=[],
                        help="override served with every deployment, e.g. --set train.runs_dir=/scratch/runs")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once in this process")
    parser.add_argument("--work-pool", default=None,
                        help="register the deployments on this process work pool instead of serving them")
    args = parser.parse_args(argv)
    prefect_env.apply_defaults()
    from diffenc_core.errors import DiffencError

    try:
        return main(params=args.params, sets=args.sets, limit=args.limit, work_pool=args.work_pool)
    except DiffencError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return SIGNAL_EXIT_BASE + signal.SIGINT


if __name__ == "__main__":
    sys.exit(cli())
