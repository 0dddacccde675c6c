"""Project-local Prefect defaults, applied before ``prefect`` is imported.

Prefect reads its settings from the environment once, when it is first imported, so every
module of ours that imports prefect calls :func:`apply_defaults` first. A value the user has
already set (in the environment) always wins; we only fill in what is missing:

- ``PREFECT_HOME=<project>/.prefect`` so running the project never writes to ``~/.prefect``
  (skipped when ``PREFECT_PROFILES_PATH`` is set: the user manages their own profiles);
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` (else telemetry errors, and "database is locked"
  tracebacks on a new database);
- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`` (a new database needs ~20 s of
  migrations; the default 20 s times out).

Nothing here stops the same flows from running against any Prefect server or Prefect Cloud:
set ``PREFECT_API_URL`` (and ``PREFECT_API_KEY`` for Cloud).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def project_root() -> Path:
    """The repository root (a source checkout), else the current folder (an installed package)."""
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        return PACKAGE_ROOT
    return Path.cwd()


def apply_defaults(root: Path | None = None) -> dict[str, str]:
    """Fill in the project's Prefect defaults (never overriding the user's); return what was set."""
    env = dict(DEFAULTS)
    if "PREFECT_HOME" not in os.environ and "PREFECT_PROFILES_PATH" not in os.environ:
        env["PREFECT_HOME"] = str((root or project_root()) / ".prefect")
    applied = {}
    for key, value in env.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    if applied and "prefect" in sys.modules and "PREFECT_HOME" in applied:
        warnings.warn(
            "prefect was imported before diffenc's Prefect defaults were applied; "
            "import flows.prefect_env (or set PREFECT_HOME) first",
            stacklevel=2,
        )
    return applied


def api_url() -> str | None:
    """The configured Prefect API (environment or active profile), or None (ephemeral mode)."""
    apply_defaults()
    from prefect.settings import get_current_settings

    return get_current_settings().api.url
