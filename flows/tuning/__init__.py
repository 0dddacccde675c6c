"""Optuna tuning: one resumable study per name, local worker pools, pruning, Pareto fronts.

``run_study`` (``diffenc tune``) runs or extends a study until it has ``n_trials`` *finished*
trials (COMPLETE or PRUNED); ``resume_study`` (``diffenc tune resume``) continues one from the
settings it stored; ``show_study`` (``diffenc tune show``) prints the best trial(s) / the Pareto
front and the resume line, and exports a trial as a params file. All Optuna code of the project
lives in this package (``diffenc_core`` never imports optuna):

- ``space``: objectives, the study name, search-space checks, suggesting a trial's values;
- ``storage``: the storage URL and Optuna storage (SQLite with a heartbeat by default);
- ``study``: creating/loading a study, its stored settings, counting its trials;
- ``objective``: one trial = one budgeted training into ``<runs_dir>/tune/<study>/<number>``;
- ``worker``: the loop that asks for trials until the target is reached;
- ``pool``: ``--workers N`` worker processes, a dead one reported and replaced;
- ``report``: tables, the resume line, export; ``run``: the commands; ``output``: the console.
"""

from diffenc_core.errors import WORKER_DIED_EXIT
from flows.tuning.pool import MAX_REPLACEMENTS, WorkerDied
from flows.tuning.report import show_study, summarize
from flows.tuning.run import resume_study, run_study, stored_study
from flows.tuning.space import MANAGED_KEYS, OBJECTIVES, check_space, study_name
from flows.tuning.storage import is_journal, storage_url

__all__ = [
    "MANAGED_KEYS", "MAX_REPLACEMENTS", "OBJECTIVES", "WORKER_DIED_EXIT", "WorkerDied", "check_space",
    "is_journal", "resume_study", "run_study", "show_study", "storage_url", "stored_study", "study_name",
    "summarize",
]
