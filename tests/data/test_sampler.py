"""Distributed sampling: disjoint, covering, deterministic, resumable, world-size independent."""

from __future__ import annotations

import pytest
import torch

from distml.data import GlobalBatchSampler, per_worker_batch, shard_range
from distml.errors import ConfigError


@pytest.mark.parametrize("n", [1, 7, 64, 100, 1437])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_eval_shards_are_disjoint_and_cover(n: int, world: int) -> None:
    seen: list[int] = []
    for rank in range(world):
        start, stop = shard_range(n, rank, world)
        seen.extend(range(start, stop))
        assert abs((stop - start) - n / world) < 1
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize(
    "n,batch,world,accum", [(100, 12, 2, 1), (1437, 64, 4, 2), (50, 6, 3, 2), (64, 64, 1, 4)]
)
def test_training_batches_are_disjoint_and_form_the_global_batch(n, batch, world, accum) -> None:
    samplers = [GlobalBatchSampler(n, batch, r, world, accum, seed=5) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [list(s.epoch_batches(epoch)) for s in samplers]
        steps = samplers[0].steps_per_epoch
        assert steps == n // batch
        used: list[int] = []
        for step in range(steps):
            micro = [mb for rank in range(world) for mb in per_rank[rank][step]]
            assert all(len(mb) == batch // (world * accum) for mb in micro)
            flat = torch.cat(micro)
            assert torch.equal(flat, samplers[0].global_batch_indices(epoch, step))
            used.extend(flat.tolist())
        assert len(used) == len(set(used)) == steps * batch  # disjoint; drops n mod batch
    # a new permutation each epoch
    assert not torch.equal(samplers[0].permutation(0), samplers[0].permutation(1))


def test_global_batches_do_not_depend_on_world_size() -> None:
    one = GlobalBatchSampler(200, 20, 0, 1, seed=1)
    four = [GlobalBatchSampler(200, 20, r, 4, seed=1) for r in range(4)]
    for step, batch in enumerate(one.epoch_batches(3)):
        merged = torch.cat([list(s.epoch_batches(3))[step][0] for s in four])
        assert torch.equal(batch[0], merged)


def test_mid_epoch_resume_yields_the_remaining_batches() -> None:
    sampler = GlobalBatchSampler(300, 30, 1, 3, 2, seed=9)
    full = list(sampler.epoch_batches(2))
    tail = list(sampler.epoch_batches(2, start_step=4))
    assert len(tail) == len(full) - 4
    for a, b in zip(full[4:], tail, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_indivisible_batch_error_names_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        per_worker_batch(100, 3, 2)
    assert str(err.value) == (
        "data.global_batch_size=100 is not divisible by workers x accumulation steps = "
        "3 x 2 = 6; use a multiple of 6 such as 96 or 102"
    )


def test_batch_larger_than_dataset() -> None:
    with pytest.raises(ConfigError, match="fewer than data.global_batch_size=64"):
        GlobalBatchSampler(10, 64, 0, 1)
