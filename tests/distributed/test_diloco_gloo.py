"""DiLoCoStrategy on real gloo process groups, against the in-process DiLoCo of `run_local`.

Each rank function runs in a spawned process with the world group initialised
(`bigbatch.testing.run_ranks`); the references are computed in the test process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bigbatch.comm import run_local
from bigbatch.distributed.diloco import DiLoCo, DiLoCoStrategy, build_pseudo_grad_compressor
from bigbatch.testing import run_ranks
from tests.unit.test_diloco import batch, clone_state, inner_step, mlp

pytestmark = pytest.mark.distributed

PARAMS = 58  # mlp(): 4*8 + 8 + 8*2 + 2
BN_PARAMS, BN_FLOAT_BUFFERS = PARAMS + 16, 2 * 8  # mlp(batchnorm=True): + weight, bias; mean, var


def _train_ranks(rank, world_size, replicas, steps, inner_steps, method, batchnorm, streaming=None):
    model = mlp(batchnorm=batchnorm)  # the same initial weights on every rank
    strategy = DiLoCoStrategy(model, torch.device("cpu"), replicas=replicas, inner_steps=inner_steps,
                              compressor=build_pseudo_grad_compressor(method), **(streaming or {}))
    opt = torch.optim.SGD(strategy.module.parameters(), lr=0.1, momentum=0.9)
    strategy.comm_metrics()  # drop the construction broadcast
    snapshots, rows = [], []
    for step in range(steps):
        x, y = batch(rank, step)
        with strategy.sync_context(last_micro_step=True):
            F.mse_loss(strategy.model(x), y).backward()
        opt.step()
        opt.zero_grad()
        metrics = strategy.after_step()  # before comm_metrics: the outer bytes land in this row
        rows.append({**metrics, **strategy.comm_metrics()})
        snapshots.append(clone_state(strategy.module))
    world_mean = strategy.all_reduce_mean(torch.tensor(float(rank))).item()
    return snapshots, rows, world_mean, strategy.model is strategy.module


def _reference_replica(comm, models, steps, inner_steps, method, ranks_per_replica, streaming=None):
    """One simulated replica: its batch is the concatenation of its ranks' batches (DDP averages
    their equal-sized shares, which is the gradient of the mean loss over the concatenation)."""
    model = models[comm.rank]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    diloco = DiLoCo(model, comm, inner_steps, compressor=build_pseudo_grad_compressor(method), **(streaming or {}))
    snapshots = []
    for step in range(steps):
        shares = [batch(comm.rank * ranks_per_replica + j, step) for j in range(ranks_per_replica)]
        inner_step(model, opt, torch.cat([x for x, _ in shares]), torch.cat([y for _, y in shares]))
        diloco.maybe_outer_step(model)
        snapshots.append(clone_state(model))
    return snapshots


def assert_states_close(got: dict, expected: dict, atol: float) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol)


@pytest.mark.slow
def test_two_replicas_of_two_ranks():
    steps, inner_steps = 5, 2  # outer steps after steps 2 and 4; step 5 ends mid-cycle
    results = run_ranks(_train_ranks, 4, 2, steps, inner_steps, "none", False, timeout_s=120)
    snapshots = [r[0] for r in results]
    base = mlp()
    reference = run_local(_reference_replica, 2, [copy.deepcopy(base) for _ in range(2)], steps,
                          inner_steps, "none", 2)
    for step in range(steps):
        state = [s[step] for s in snapshots]
        for key in state[0]:  # DDP keeps each replica's two ranks bitwise identical
            assert torch.equal(state[0][key], state[1][key]) and torch.equal(state[2][key], state[3][key])
        replicas_equal = all(torch.equal(state[0][k], state[2][k]) for k in state[0])
        assert replicas_equal == ((step + 1) % inner_steps == 0), step  # only after an outer step
        for rank in range(4):
            assert_states_close(state[rank], reference[rank // 2][step], atol=1e-5)
    for _, rows, world_mean, unwrapped in results:
        assert world_mean == 1.5 and not unwrapped  # (0+1+2+3)/4 over the world; DDP inside
        for step, row in enumerate(rows, start=1):
            outer = step % inner_steps == 0
            assert row["comm_bytes/grad_allreduce"] == PARAMS * 4  # intra-replica, every step
            assert row["comm_bytes/diloco_outer"] == (PARAMS * 4 if outer else 0)
            assert row.get("diloco_outer_step") == (step // inner_steps if outer else None)


@pytest.mark.slow
def test_one_rank_per_replica_fp16_pseudo_gradients_and_buffers():
    steps, inner_steps = 4, 2
    results = run_ranks(_train_ranks, 2, 2, steps, inner_steps, "fp16", True, timeout_s=120)
    base = mlp(batchnorm=True)
    reference = run_local(_reference_replica, 2, [copy.deepcopy(base) for _ in range(2)], steps,
                          inner_steps, "fp16", 1)
    for rank, (snapshots, rows, world_mean, unwrapped) in enumerate(results):
        assert unwrapped and world_mean == 0.5  # m = 1: no DDP wrapper
        for step, row in enumerate(rows, start=1):
            outer = step % inner_steps == 0
            assert row["comm_bytes/diloco_outer"] == (BN_PARAMS * 2 if outer else 0)  # fp16: half
            assert row["comm_bytes/diloco_outer_uncompressed"] == (BN_PARAMS * 4 if outer else 0)
            assert row.get("comm_bytes/diloco_buffers", 0) == (BN_FLOAT_BUFFERS * 4 if outer else 0)
            assert row.get("comm_bytes/grad_allreduce", 0) == 0
            assert_states_close(snapshots[step - 1], reference[rank][step - 1], atol=1e-6)
    final = [r[0][-1] for r in results]  # after the outer step at step 4: identical, buffers too
    for key in final[0]:
        assert torch.equal(final[0][key], final[1][key]), key


# mlp()'s tensors (8, 4), (8,), (2, 8), (2,) in blocks of 64: one scale each, 4 bytes apiece
QUANTIZED_BYTES = {"int8": (32 + 8 + 16 + 2) + 4 * 4, "int4": (16 + 4 + 8 + 1) + 4 * 4}
FRAGMENT_QUANTIZED_BYTES = {"int8": {0: 32 + 4, 1: (8 + 16 + 2) + 4 * 3},  # fragments: 0.weight | the rest
                            "int4": {0: 16 + 4, 1: (4 + 8 + 1) + 4 * 3}}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("streaming", [{}, {"fragments": 2, "sync_delay": 1, "mixing": 0.5}])
def test_quantized_pseudo_gradients_on_gloo_match_the_simulation_bitwise(method, streaming):
    """2 ranks, one replica each, H = 4: the all-gathered codes and scales give every rank the same
    average, bit for bit the in-process simulation's; the bytes are codes plus scales."""
    steps, inner_steps = 8, 4
    results = run_ranks(_train_ranks, 2, 2, steps, inner_steps, method, False, streaming, timeout_s=120)
    base = mlp()
    reference = run_local(_reference_replica, 2, [copy.deepcopy(base) for _ in range(2)], steps,
                          inner_steps, method, 1, streaming)
    for rank, (snapshots, rows, _, _) in enumerate(results):
        for step, row in enumerate(rows, start=1):
            for key, value in reference[rank][step - 1].items():
                assert torch.equal(snapshots[step - 1][key], value), (rank, step, key)
            if not streaming:  # the whole model at steps 4 and 8
                expected = QUANTIZED_BYTES[method] if step % inner_steps == 0 else 0
            else:  # fragment 0 starts at steps 1, 5 (due 2, 6), fragment 1 at 3, 7 (due 4, 8)
                expected = {1: FRAGMENT_QUANTIZED_BYTES[method][0], 3: FRAGMENT_QUANTIZED_BYTES[method][1]}.get(
                    step % inner_steps, 0)
            assert row["comm_bytes/diloco_outer"] == expected, (rank, step)
    for key in results[0][0][-1]:  # after the last fragment's sync every replica holds theta_global...
        if not streaming:  # ... mixing 0.5 keeps part of each replica's own weights
            assert torch.equal(results[0][0][-1][key], results[1][0][-1][key]), key
