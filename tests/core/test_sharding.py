"""Data-parallel bookkeeping in one process: who owns which example, how rank losses and statistics
add up to the global batch's, when a rank prints (no process group; tests/flows/test_distributed.py
starts real jobs)."""

from __future__ import annotations

import pytest
import torch

from diffenc_core import config, distributed, runstart, trainer
from diffenc_core.errors import ConfigError, PeerStopped

N = 1000


@pytest.mark.parametrize("size", [2, 3])
def test_every_example_of_a_batch_is_trained_by_exactly_its_owner(size):
    worlds = [distributed.World(rank=r, size=size) for r in range(size)]
    owned = [torch.arange(r, N, size) for r in range(size)]  # example i belongs to rank i % size
    assert [w.owned(N) for w in worlds] == [len(o) for o in owned]
    for step in range(3):
        idx = trainer.batch_indices(0, step, N, 128)
        parts = [owned[w.rank][w.shard(idx)] for w in worlds]
        assert sorted(torch.cat(parts).tolist()) == sorted(idx.tolist())
        assert all((p % size == r).all() for r, p in enumerate(parts))


def test_rank_rows_put_back_in_order_are_the_whole_tensor():
    full = torch.randn(N, 3)
    worlds = [distributed.World(rank=r, size=3) for r in range(3)]
    back = torch.empty_like(full)
    for w in worlds:
        back[w.rank :: 3] = w.rows(full)
    assert torch.equal(back, full)


def test_weighted_rank_means_average_to_the_global_batch_mean():
    """DDP averages the ranks' gradients; each rank's mean loss times its share makes that average the
    gradient of the global-batch mean, also for unequal shards."""
    idx = trainer.batch_indices(1, 0, N, 100)
    per_example = torch.randn(N)
    worlds = [distributed.World(rank=r, size=3) for r in range(3)]
    ddp_average = sum(
        per_example[torch.arange(w.rank, N, 3)][w.shard(idx)].mean() * w.loss_scale(w.shard(idx).numel(), 100)
        for w in worlds) / 3
    assert torch.isclose(ddp_average, per_example[idx].mean(), atol=1e-6)
    assert len({w.shard(idx).numel() for w in worlds}) > 1, "the shards are unequal here"


def test_step_statistics_are_the_global_batch_means():
    counts = torch.tensor([30.0, 34.0, 0.0])  # the third rank had none of the batch (a zero-weight step)
    values = torch.tensor([[1.0, 2.0], [3.0, 1.0], [99.0, 99.0]])
    merged = distributed.merge_stats(counts, values, ["accept", "retries"], 64)
    assert merged["accept"] == pytest.approx((30 * 1.0 + 34 * 3.0) / 64)
    assert merged["retries"] == 2.0  # a count: the worst rank's


def test_one_process_changes_nothing():
    world = distributed.World()
    idx = trainer.batch_indices(0, 0, N, 64)
    full = torch.randn(N, 2)
    loss = torch.tensor(3.0)
    assert world.shard(idx) is idx and world.rows(full) is full and world.gather_rows(full, N) is full
    assert world.loss_scale(64, 64) == 1.0 and distributed.weighted(loss, 1.0) is loss
    assert world.from_main(lambda: 7) == 7 and world.objects("x") == ["x"]
    with pytest.raises(ConfigError, match="bad"):
        world.agree(ConfigError("bad"))
    module = torch.nn.Linear(2, 2)
    assert world.wrap(module) is module


def test_a_rank_of_a_job_stops_quietly_when_all_fail_alike():
    err = ConfigError("train.beta: bad")
    assert distributed.World(rank=0, size=2).together(err) is err
    quiet = distributed.World(rank=1, size=2).together(err)
    assert isinstance(quiet, PeerStopped) and quiet.exit_code == 2 and not distributed.should_print(quiet)


def test_rank_streams_are_distinct_and_reproducible():
    seeds = [distributed.rank_seed(0, 100, r) for r in range(4)]
    assert len(set(seeds)) == 4 and seeds == [distributed.rank_seed(0, 100, r) for r in range(4)]
    assert distributed.rank_seed(0, 100, 0) != distributed.rank_seed(0, 101, 0)


def test_who_prints_a_jobs_error(monkeypatch):
    err = ConfigError("x")
    assert distributed.should_print(err)  # one process
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not distributed.should_print(err), "before the job forms, only local rank 0 prints"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.should_print(err)
    monkeypatch.setenv(distributed.LAUNCHED_ENV, "1")
    assert not distributed.should_print(err), "diffenc train --nproc reports the outcome itself"


def test_collective_failures_read_as_one_short_line():
    gloo = RuntimeError("[/src/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:45473: Connection reset "
                        "by peer. This is typically caused by a remote worker hanging.\nmore")
    assert distributed._backend_reason(gloo) == "Read error [127.0.0.1]:45473: Connection reset by peer"
    assert distributed._collective_failure(gloo) and not distributed._collective_failure(ValueError("gloo"))


def test_processes_are_a_setting_that_may_change_on_resume():
    assert config.load(None, ["train.nproc=4"]).train.nproc == 4
    with pytest.raises(ConfigError, match="--set train.nproc"):
        config.load(None, ["train.nproc=0"])
    with pytest.raises(ConfigError, match="--set train.dist_timeout_s"):
        config.load(None, ["train.dist_timeout_s=0"])
    assert runstart.ignored_on_resume("train.nproc") and runstart.ignored_on_resume("train.dist_timeout_s")
