"""Data-parallel bookkeeping in one process: how a batch is shared out, what one process skips, when a
rank prints (no process group; tests/flows/test_distributed.py starts real jobs)."""

from __future__ import annotations

import pytest
import torch

from diffenc_core import config, distributed, runstart, trainer
from diffenc_core.errors import ConfigError, PeerStopped

N = 1000


@pytest.mark.parametrize("size", [2, 4])
def test_the_shares_of_a_batch_are_equal_and_cover_it_once(size):
    worlds = [distributed.World(rank=r, size=size) for r in range(size)]
    for step in range(3):
        idx = trainer.batch_indices(0, step, N, 128)
        parts = [w.share(idx) for w in worlds]
        assert torch.equal(torch.cat(parts), idx), "in rank order, the shares are the batch"
        assert {p.numel() for p in parts} == {128 // size}, "equal shares: DDP's plain average is the batch mean"


def test_a_batch_that_does_not_split_evenly_is_one_message():
    distributed.World(rank=0, size=2).check_batch(128, N)
    distributed.World().check_batch(7, 3)  # one process: anything goes
    with pytest.raises(ConfigError, match="train.batch_size: 100 must be a multiple of the 3 processes"):
        distributed.World(rank=0, size=3).check_batch(100, N)
    with pytest.raises(ConfigError, match="at most the 50 training examples"):
        distributed.World(rank=1, size=2).check_batch(64, 50)


def test_one_process_changes_nothing():
    world = distributed.World()
    idx = trainer.batch_indices(0, 0, N, 64)
    z = torch.randn(64, 2)
    assert world.share(idx) is idx and world.all_gather_rows(idx, z) == (idx, z)
    assert world.agree_step(15, 2.5) == (15, 2.5)
    assert world.mean_stats({"accept": torch.tensor(0.5), "retries": torch.tensor(2.0)}) == {"accept": 0.5,
                                                                                           "retries": 2.0}
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
