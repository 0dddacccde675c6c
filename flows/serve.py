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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows import prefect_env

DEFAULT_PARAMS = Path("params.yaml")


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
         work_pool: str | None = None) -> None:
    """Serve all deployments until interrupted (or, with ``work_pool``, register them there)."""
    prefect_env.apply_defaults()
    sets = list(sets or [])
    _base(params, sets)  # a bad configuration fails before anything is registered
    url = _require_api()
    if work_pool:
        for name in deploy_to_pool(work_pool, params, sets):
            print(f"deployed {name} to work pool '{work_pool}'")
        print(f"now start workers: prefect worker start --pool {work_pool}  (one per machine or core set)")
        return
    from prefect import serve

    deps = deployments(params, sets)
    print(f"serving {len(deps)} deployments against {url} from {Path.cwd()}", flush=True)
    serve(*deps, limit=limit)


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
        main(params=args.params, sets=args.sets, limit=args.limit, work_pool=args.work_pool)
    except DiffencError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
