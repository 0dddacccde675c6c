"""Training steps of both methods on the same global batches, with identical inputs and noise in any
number of processes: every random draw is replaced by a value that depends only on its example (noise
zero, uniforms one half, the reparameterisation's epsilon a function of the example's own mean, a fixed
log-SNR), so one process and N must agree up to float summation order.

    python tests/dist_match.py DATA_ROOT OUT.pt                              # one process
    python -m torch.distributed.run --nproc-per-node 2 tests/dist_match.py DATA_ROOT OUT.pt

Rank 0 saves, per method: the gradients after every step, the final parameters and (diffusion) every
example's E-step state (replicated on every rank). Chain replay draws from each rank's own random
stream, so the diffusion runs here use one encoder update per step (no replay).
"""

from __future__ import annotations

import sys

import torch
from tiny import tiny

from diffenc_core import config, data, distributed, trainer
from diffenc_core.schedule import LogSNRSchedule

STEPS = 4
METHOD_SETS = {
    # two VAE-phase steps, then EM with MALA and a z* M-step
    "diffusion": ["train.method=diffusion", "em.vae_steps=2", "em.encoder_updates=1", "em.m_step=zstar"],
    "vae": ["train.method=vae"],
}


def _size(size: tuple) -> tuple:
    return tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size) else size


def per_example_noise() -> None:
    """Every draw the training steps make, as a function of the example alone."""
    torch.randn = lambda *size, generator=None, **kw: torch.zeros(_size(size), **kw)
    torch.rand = lambda *size, generator=None, **kw: torch.full(_size(size), 0.5, **kw)
    torch.randn_like = lambda t, **kw: torch.sin(7.0 * t.detach() + 1.0)
    LogSNRSchedule.sample_logsnr = lambda self, n, generator=None, device=None: torch.zeros(n, device=device)


def main(root: str, out: str) -> None:
    world = distributed.join(timeout_s=120, cuda=False)
    results = {}
    for name, sets in METHOD_SETS.items():
        cfg = config.load(None, tiny(f"data.root={root}", *sets))
        split = data.load_split(cfg.data.prepared_dir, "train")
        n = len(split)
        torch.manual_seed(cfg.train.seed)
        method = trainer.build_method(cfg, split.manifest)
        if hasattr(method, "attach_data"):
            method.attach_data(trainer.TrainingSet(split.x))
        method.distribute(world)
        per_example_noise()
        grads = []
        for step in range(STEPS):
            idx = world.share(trainer.batch_indices(cfg.train.seed, step, n, cfg.train.batch_size))
            method.train_step(step, idx, split.x[idx])
            grads.append({k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None})
        results[name] = {"grads": grads, "models": method.state()["models"]}
    if world.is_main:
        torch.save(results, out)
    distributed.leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
