"""DiLoCoStrategy's synchronous warm-up on real gloo process groups.

During the warm-up every rank steps with the gradient of the whole global batch (DDP inside a
replica, then the cross-replica average), so all ranks hold bitwise the same weights and clip with the
same norm; they equal one process training on the concatenated batches. After it, the run equals the
in-process simulation (`run_local`) of DiLoCo with the same warm-up.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bigbatch.comm import run_local
from bigbatch.distributed.diloco import DiLoCo, DiLoCoStrategy
from bigbatch.testing import run_ranks
from tests.unit.test_diloco import batch, clone_state, mlp

pytestmark = pytest.mark.distributed

PARAMS, STEPS, WARMUP, INNER_STEPS, CLIP = 58, 6, 2, 2, 0.5  # outer steps after steps 4 and 6


def _train_ranks(rank, world_size, replicas):
    model = mlp()
    strategy = DiLoCoStrategy(model, torch.device("cpu"), replicas=replicas, inner_steps=INNER_STEPS,
                              warmup_steps=WARMUP)
    opt = torch.optim.SGD(strategy.module.parameters(), lr=0.1, momentum=0.9)
    strategy.comm_metrics()  # drop the construction broadcast
    snapshots, rows = [], []
    for step in range(STEPS):
        x, y = batch(rank, step)
        with strategy.sync_context(last_micro_step=True):
            F.mse_loss(strategy.model(x), y).backward()
        norm = strategy.optimizer_step(opt, CLIP)
        opt.zero_grad()
        rows.append({**strategy.after_step(), **strategy.comm_metrics(), "norm": norm})
        snapshots.append(clone_state(strategy.module))
    return snapshots, rows


def _clipped_step(model, opt, x, y) -> None:
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()


def _reference_replica(comm, models, ranks_per_replica):
    """One simulated replica on the concatenation of its ranks' batches, warm-up gradients averaged."""
    model = models[comm.rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    diloco = DiLoCo(model, comm, INNER_STEPS, warmup_steps=WARMUP)
    snapshots = []
    for step in range(STEPS):
        shares = [batch(comm.rank * ranks_per_replica + j, step) for j in range(ranks_per_replica)]
        opt.zero_grad()
        F.mse_loss(model(torch.cat([x for x, _ in shares])), torch.cat([y for _, y in shares])).backward()
        diloco.sync_warmup_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        diloco.maybe_outer_step(model)
        snapshots.append(clone_state(model))
    return snapshots


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])  # 2 replicas of one rank, of two ranks (DDP inside)
def test_warmup_is_data_parallel_across_replicas_then_diloco(world_size):
    results = run_ranks(_train_ranks, world_size, 2, timeout_s=120)
    per_replica = world_size // 2
    base = mlp()
    single = copy.deepcopy(base)  # the warm-up's reference: one process, the whole global batch
    single_opt = torch.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    reference = run_local(_reference_replica, 2, [copy.deepcopy(base) for _ in range(2)], per_replica)
    for step in range(STEPS):
        states = [r[0][step] for r in results]
        if step < WARMUP:
            shares = [batch(rank, step) for rank in range(world_size)]
            _clipped_step(single, single_opt, torch.cat([x for x, _ in shares]), torch.cat([y for _, y in shares]))
            assert len({r[1][step]["norm"] for r in results}) == 1  # the same clipping everywhere
        for key in states[0]:
            if step < WARMUP:  # every rank bitwise the same, and the single process's to float error
                assert all(torch.equal(s[key], states[0][key]) for s in states), (step, key)
                torch.testing.assert_close(states[0][key], single.state_dict()[key], rtol=0, atol=1e-6)
            for rank, state in enumerate(states):
                torch.testing.assert_close(state[key], reference[rank // per_replica][step][key], rtol=0,
                                           atol=1e-5)
    for _, rows in results:
        for step, row in enumerate(rows, start=1):
            assert row["comm_bytes/diloco_warmup"] == (PARAMS * 4 if step <= WARMUP else 0), step
            assert row["comm_bytes/diloco_outer"] == (PARAMS * 4 if step in (4, 6) else 0), step
            assert row.get("comm_bytes/grad_allreduce", 0) == (PARAMS * 4 if per_replica > 1 else 0)
            assert row.get("diloco_outer_step") == {4: 1, 6: 2}.get(step), step
    replicas_differ = [not torch.equal(results[0][0][step]["0.weight"], results[-1][0][step]["0.weight"])
                       for step in range(STEPS)]
    assert replicas_differ == [False, False, True, False, True, False]  # alone at steps 3 and 5 only
