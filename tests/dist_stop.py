"""A stop request that one rank alone has seen (rank 1 here: the launcher's request file can appear between
the ranks' checks of one step). Every rank stops after that step and rank 0, which writes the status, records
the request's reason.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_stop.py DATA_ROOT RUNS_DIR
"""

from __future__ import annotations

import sys

from tiny import tiny

from diffenc_core import config, distributed, runstart, trainer

REASON = "pruned by rank 1"


def main(root: str, runs_dir: str) -> None:
    world = distributed.join(timeout_s=120, cuda=False)
    cfg = config.load(None, tiny(f"data.root={root}", f"train.runs_dir={runs_dir}", "train.method=vae",
                                 "train.steps=1000"))
    asked = 0

    def ask() -> str | None:
        nonlocal asked
        asked += 1
        return REASON if world.rank == 1 and asked == 3 else None

    try:
        plan = world.from_main(lambda: runstart.plan(cfg, "new"))
        trainer.train(cfg, plan, stop_requested=ask)
    except trainer.StopTraining as stopped:
        print(f"rank {world.rank}: {stopped}", flush=True)
    finally:
        distributed.leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
