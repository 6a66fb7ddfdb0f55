"""The sampler: deterministic from (seed, epoch), disjoint shards, exact coverage, batch changes."""

from __future__ import annotations

import torch

from bigbatch.data.sampler import GlobalSampler


def test_same_seed_same_order_and_other_seed_differs():
    a, b, c = GlobalSampler(100, 7), GlobalSampler(100, 7), GlobalSampler(100, 8)
    assert torch.equal(a.stream(0, 250), b.stream(0, 250))
    assert not torch.equal(a.stream(0, 100), c.stream(0, 100))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = GlobalSampler(50, 1)
    first, second = sampler.stream(0, 50), sampler.stream(50, 50)
    assert sorted(first.tolist()) == list(range(50)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_rank_shards_are_disjoint_and_cover_the_step():
    world, batch = 4, 12
    shards = [GlobalSampler(60, 0, r, world).rank_indices(24, batch) for r in range(world)]
    together = torch.cat(shards)
    assert len(set(together.tolist())) == batch  # disjoint
    assert torch.equal(together, GlobalSampler(60, 0).stream(24, batch))  # exactly the step's slice


def test_epoch_covered_exactly_once_across_a_batch_change():
    # 96 samples: 3 steps of 16 then 2 steps of 24 (a ramp) consume exactly one epoch over 2 ranks.
    world, seen, position = 2, [], 0
    for batch in (16, 16, 16, 24, 24):
        for rank in range(world):
            seen += GlobalSampler(96, 5, rank, world).rank_indices(position, batch).tolist()
        position += batch
    assert sorted(seen) == list(range(96))


def test_resumed_sampler_continues_the_stream():
    whole = GlobalSampler(30, 2).stream(0, 75)
    resumed = GlobalSampler(30, 2)  # a fresh object, as after a restart
    assert torch.equal(resumed.stream(40, 35), whole[40:])
