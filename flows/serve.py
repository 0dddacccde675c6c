"""Serve every diffenc deployment (``diffenc serve`` / ``python -m flows.serve``).

Needs a Prefect API: a local server (``prefect server start --host 127.0.0.1``) with
``PREFECT_API_URL=http://127.0.0.1:4200/api``, any other Prefect server, or Prefect Cloud.
Run it from the project root: flow runs inherit its working folder, so the relative paths in
``params.yaml`` (``data/prepared``, ``runs``) mean the same as for the CLI and DVC.

Each flow of :data:`flows.prefect_flows.FLOWS` becomes the deployment ``<flow>/default`` whose
default parameters are this process's ``--params`` file and ``--set`` overrides; a flow run
adds its own ``overrides`` on top, e.g.::

    prefect deployment run 'diffenc-train/default' --param overrides='{"train.beta": 0.5}' --watch

It runs at most ``--limit`` flow runs at once (by default :func:`default_limit`: one per core, as
many as the available memory holds) and asks the server for runs every :data:`RUNNER_POLL_S`
seconds; the other runs wait their turn (the server labels them *Late* after 15 s).

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

from diffenc_core.errors import signal_exit
from flows import prefect_env

DEFAULT_PARAMS = Path("params.yaml")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_TIMEOUT_S = 5.0  # after a stop signal, Prefect's runner gets this long to stop its flow runs cleanly
POLL_S = 0.2  # how often the main thread looks at the runner and at received signals
MB_PER_RUN = 400  # resident memory of one flow-run process while it trains (~370 MB measured, issue 19)
MIN_LIMIT = 2  # a fan-out parent (β sweep, tuning fan-out) holds a slot while its children run
MEMINFO = Path("/proc/meminfo")
RUNNER_POLL_S = 2.0
"""How often the runner asks the server for runs to start (Prefect's default is 10 s): a slot that
frees stays idle at most this long while runs wait (issue 19 item 15, ``benchmarks/load_prefect.py``)."""
POLL_ENV = "PREFECT_RUNNER_POLL_FREQUENCY"  # set by the user, it wins over RUNNER_POLL_S
LIMIT_HELP = (f"most flow runs at once in this process (default: one per core, no more than the available "
              f"memory / {MB_PER_RUN} MB, at least {MIN_LIMIT}; printed when serving starts)")


def _base(params: Path | None, sets: list[str]) -> str | None:
    """Validate the served defaults now (a bad --set fails here, not in every flow run) and
    return the params file to use (absolute), or None for the built-in defaults."""
    from diffenc_core import config as config_mod

    if params is None or (params == DEFAULT_PARAMS and not params.exists()):
        config_mod.load(None, sets)
        return None
    config_mod.load(params, sets)  # ConfigError for a missing or bad file, or a bad --set
    return str(params.resolve())


def available_mb() -> float | None:
    """Memory available for new processes without swapping (Linux ``MemAvailable``), in MB;
    free physical pages elsewhere; None when neither can be read."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_limit(cores: int | None = None, memory_mb: float | None = None) -> int:
    """Flow runs at once when ``--limit`` is not given: one per core, no more than the available
    memory holds at :data:`MB_PER_RUN` each, and at least :data:`MIN_LIMIT`."""
    cores = usable_cores() if cores is None else cores
    memory_mb = available_mb() if memory_mb is None else memory_mb
    by_memory = int(memory_mb // MB_PER_RUN) if memory_mb is not None else cores
    return max(MIN_LIMIT, min(cores, by_memory))


def poll_seconds() -> float:
    """The runner's poll interval: ``PREFECT_RUNNER_POLL_FREQUENCY`` when set, else :data:`RUNNER_POLL_S`."""
    from diffenc_core.errors import ConfigError

    value = os.environ.get(POLL_ENV)
    if not value:
        return RUNNER_POLL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):  # NaN fails the first test
        raise ConfigError(f"{POLL_ENV}={value!r}: expected a number of seconds above 0, e.g. 2")
    return seconds


def check_limit(limit: int | None) -> int:
    """``limit``, or the machine's default for None; a limit below 1 is a user error."""
    from diffenc_core.errors import ConfigError

    if limit is None:
        return default_limit()
    if limit < 1:
        raise ConfigError(f"--limit {limit}: must be at least 1 flow run at once")
    return limit


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
    if not work_pool:
        limit, poll = check_limit(limit), poll_seconds()
    url = _require_api()
    if work_pool:
        for name in deploy_to_pool(work_pool, params, sets):
            print(f"deployed {name} to work pool '{work_pool}'")
        print(f"now start workers: prefect worker start --pool {work_pool}  (one per machine or core set)")
        return 0
    deps = deployments(params, sets)
    print(f"serving {len(deps)} deployments against {url} from {Path.cwd()}, "
          f"at most {limit} flow runs at once (--limit), asking for runs every {poll:g} s", flush=True)
    return serve_until_stopped(deps, limit, poll)


def serve_until_stopped(deps: list, limit: int | None = None, poll_s: float = RUNNER_POLL_S) -> int:
    """Serve ``deps`` until a stop signal (0 if the runner ends by itself, else 128 + the signal).

    A runner that has not stopped :data:`STOP_TIMEOUT_S` after the signal (a server that does not
    answer) is abandoned: its flow-run processes get SIGTERM and this process exits at once.
    """
    from prefect.runner import Runner

    # pausing schedules would ask the server too
    runner = Runner(pause_on_shutdown=False, limit=limit, query_seconds=poll_s)
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
        code = signal_exit(received[0])
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
    parser.add_argument("--limit", type=int, default=None, help=LIMIT_HELP)
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
        return signal_exit(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(cli())
