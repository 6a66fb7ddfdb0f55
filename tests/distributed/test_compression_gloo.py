"""Communicator and compressors on 2 gloo ranks, against single-process references.

Each rank function runs in a spawned process with the gloo group already initialised
(`bigbatch.testing.run_ranks`); the expected values are computed in the test process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigbatch.compression.base import NoCompression
from bigbatch.compression.ddp_hook import param_names_by_id, register_compression_hook
from bigbatch.compression.factory import build_compressor
from bigbatch.compression.powersgd import PowerSGD
from bigbatch.compression.torch_powersgd import register_torch_powersgd
from bigbatch.distributed.allreduce_bench import run_allreduce_bench
from bigbatch.comm import Communicator
from bigbatch.distributed.ddp import DDPStrategy
from bigbatch.testing import run_ranks
from tests.unit.test_powersgd import (apply_compressor, assert_outputs_close, make_grads,
                                      reference_powersgd)

pytestmark = pytest.mark.distributed

WORLD = 2
MLP_PARAMS = 6467  # 2048 + 64 + 4096 + 64 + 192 + 3, see mlp()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


def batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [(torch.randn(8, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(steps)]


def _collectives(rank, world_size):
    comm = Communicator()
    avg = comm.all_reduce(torch.full((5,), rank + 1.0), "grads")
    top = comm.all_reduce(torch.full((5,), rank + 1.0), "grads", op="max")
    fut = comm.all_reduce(torch.full((5,), rank + 1.0), "grads", op="sum", async_op=True)
    gathered = comm.all_gather(torch.tensor([rank + 1.0]))
    bcast = comm.broadcast(torch.tensor([rank + 1.0]), src=1)
    comm.barrier()
    return avg, top, fut.wait(), gathered, bcast, comm.take_step_stats()


def test_communicator_on_gloo():
    for avg, top, summed, gathered, bcast, stats in run_ranks(_collectives, WORLD):
        assert torch.equal(avg, torch.full((5,), 1.5))  # (1 + 2) / 2
        assert torch.equal(top, torch.full((5,), 2.0))
        assert torch.equal(summed, torch.full((5,), 3.0))
        assert [g.item() for g in gathered] == [1.0, 2.0] and bcast.item() == 2.0
        assert stats["comm_bytes/grads"] == 3 * 5 * 4  # three calls of five float32
        assert stats["comm_bytes/all_gather"] == 4 and stats["comm_bytes/broadcast"] == 4
        assert stats["comm_s/grads"] > 0


def _powersgd_on_gloo(rank, world_size, grads, settings):
    compressor = PowerSGD(**settings)
    return apply_compressor(Communicator(), compressor, grads), compressor.state_dict()


def test_powersgd_two_ranks_match_single_process_reference():
    settings = dict(rank=2, start_step=1, seed=3)
    grads = make_grads(steps=4, world_size=WORLD, seed=21)
    expected = reference_powersgd(grads, **settings)
    results = run_ranks(_powersgd_on_gloo, WORLD, grads, settings)
    for outputs, _ in results:
        assert_outputs_close(outputs, expected, atol=1e-4)
    # Each rank keeps its own residual, and they differ (each rank's gradient differs).
    errors = [state["errors"]["0.weight"] for _, state in results]
    assert not torch.allclose(errors[0], errors[1])


def _low_precision_on_gloo(rank, world_size, method):
    gen = torch.Generator().manual_seed(rank)
    grads = [("w", torch.randn(33, 17, generator=gen) * 100), ("b", torch.randn(9, generator=gen))]
    inputs = [g.clone() for _, g in grads]
    build_compressor(method).reduce(grads, Communicator())
    return inputs, [g for _, g in grads]


@pytest.mark.parametrize("method, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_low_precision_matches_plain_allreduce(method, dtype):
    # Rounding a and b (or a/2 and b/2) and their sum to a format with unit roundoff u = eps/2 errs
    # by at most u(|a| + |b|) on the mean; the bound is relative to the inputs, not to the mean,
    # which cancellation can make small. We allow eps(|a| + |b|), twice that.
    results = run_ranks(_low_precision_on_gloo, WORLD, method)
    eps = torch.finfo(dtype).eps
    for i, (a, b) in enumerate(zip(results[0][0], results[1][0])):
        mean, bound = (a + b) / 2, eps * (a.abs() + b.abs()) + 1e-6
        for _, outputs in results:
            assert ((outputs[i] - mean).abs() <= bound).all()
            assert not torch.equal(outputs[i], mean)  # it really went through low precision


def _train(model, ddp, steps, rank, after_backward=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in batches(rank, steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _hook_vs_default(rank, world_size, method):
    default_model = mlp()
    default = _train(default_model, DistributedDataParallel(default_model), 4, rank)
    model, comm, compressor = mlp(), Communicator(), build_compressor(method)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)  # ~4 KB: several buckets per step
    register_compression_hook(ddp, compressor, comm, param_names_by_id(model))
    hooked = _train(model, ddp, 4, rank)
    return default, hooked, compressor.step, comm.totals()


@pytest.mark.slow
@pytest.mark.parametrize("method, kind, element_size, atol", [
    ("none", "grad_allreduce", 4, 1e-6),
    ("fp16", "grad_allreduce_fp16", 2, 1e-3),  # 4 SGD steps of half-precision gradients
])
def test_ddp_hook_matches_default_ddp(method, kind, element_size, atol):
    for default, hooked, steps, totals in run_ranks(_hook_vs_default, WORLD, method):
        for name in default:
            torch.testing.assert_close(hooked[name], default[name], rtol=0, atol=atol)
        assert steps == 4  # once per optimizer step, not once per bucket
        assert totals[f"comm_bytes/{kind}"] == 4 * MLP_PARAMS * element_size
        assert totals["comm_bytes/uncompressed"] == 4 * MLP_PARAMS * 4
    assert not torch.equal(default["0.weight"], mlp()[0].weight)  # training moved the weights


def _strategy_steps(rank, world_size, native):
    """3 optimizer steps of 2 accumulated micro-batches through DDPStrategy; per-step comm stats."""
    model = mlp()
    strategy = DDPStrategy(model, torch.device("cpu"), bucket_cap_mb=0.004, compressor=NoCompression(),
                           native_allreduce=native)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    data, stats = batches(rank, 6), []
    for step in range(3):
        for micro in (0, 1):
            x, y = data[2 * step + micro]
            with strategy.sync_context(last_micro_step=micro == 1):
                strategy.backward(nn.functional.cross_entropy(strategy.model(x), y) / 2)
        strategy.optimizer_step(optimizer, grad_clip=None)
        optimizer.zero_grad(set_to_none=True)
        stats.append(strategy.comm_metrics())
    return {name: p.detach().clone() for name, p in model.named_parameters()}, stats, strategy.compressor.step


@pytest.mark.slow
def test_native_allreduce_matches_our_hook_and_counts_bytes_untimed():
    hooked, native = run_ranks(_strategy_steps, WORLD, False), run_ranks(_strategy_steps, WORLD, True)
    for (hooked_params, hooked_stats, _), (native_params, native_stats, native_steps) in zip(hooked, native):
        for name in hooked_params:
            torch.testing.assert_close(native_params[name], hooked_params[name], rtol=0, atol=1e-6)
        assert native_steps == 3  # end_step once per optimizer step, not per micro-batch
        for hooked_row, native_row in zip(hooked_stats, native_stats):
            for row in (hooked_row, native_row):  # once per step although each step has 2 backwards
                assert row["comm_bytes/grad_allreduce"] == row["comm_bytes/uncompressed"] == MLP_PARAMS * 4
            assert hooked_row["comm_s/grad_allreduce"] > 0
            assert "comm_s/grad_allreduce" not in native_row  # DDP's C++ all-reduce is not timed
    assert not torch.equal(native[0][0]["0.weight"], mlp()[0].weight)


def _hook_vs_manual(rank, world_size, settings):
    model, comm = mlp(), Communicator()
    hooked_compressor = PowerSGD(**settings)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)
    register_compression_hook(ddp, hooked_compressor, comm, param_names_by_id(model))
    hooked = _train(model, ddp, 5, rank)

    manual_model, manual_compressor = mlp(), PowerSGD(**settings)

    def reduce_manually():
        manual_compressor.reduce([(n, p.grad) for n, p in manual_model.named_parameters()], comm)
        manual_compressor.end_step()

    manual = _train(manual_model, manual_model, 5, rank, after_backward=reduce_manually)
    return hooked, manual, hooked_compressor.state_dict(), manual_compressor.state_dict()


def test_ddp_hook_with_powersgd_matches_the_compressor_applied_by_hand():
    settings = dict(rank=2, start_step=2)
    for hooked, manual, hooked_state, manual_state in run_ranks(_hook_vs_manual, WORLD, settings):
        for name in manual:
            torch.testing.assert_close(hooked[name], manual[name], rtol=0, atol=1e-6)
        assert hooked_state["step"] == manual_state["step"] == 5
        assert hooked_state["errors"].keys() == manual_state["errors"].keys() == {"0.weight", "2.weight"}
        for name, error in manual_state["errors"].items():
            torch.testing.assert_close(hooked_state["errors"][name], error, rtol=0, atol=1e-6)


def _torch_powersgd(rank, world_size):
    model, comm = mlp(), Communicator()
    ddp = DistributedDataParallel(model)
    register_torch_powersgd(ddp, rank=2, start_step=2, min_compression_rate=2.0, comm=comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    stats = []
    for x, y in batches(rank, 4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        stats.append(comm.take_step_stats())
    return stats, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_torch_powersgd_baseline_is_counted_analytically():
    # One bucket. torch's rule, compress iff (n + m) * r * rate < n * m, gives the same split as
    # ours for this MLP: P = 128 + 128, Q = 64 + 128, uncompressed = 64 + 64 + 192 + 3 elements.
    results = run_ranks(_torch_powersgd, WORLD)
    for stats, _ in results:
        for step in (0, 1):  # plain all-reduce before start_step
            assert stats[step]["comm_bytes/grad_allreduce"] == MLP_PARAMS * 4
        for step in (2, 3):
            assert stats[step]["comm_bytes/powersgd_p"] == 256 * 4
            assert stats[step]["comm_bytes/powersgd_q"] == 192 * 4
            assert stats[step]["comm_bytes/powersgd_uncompressed"] == 323 * 4
            assert stats[step]["comm_bytes/grad_allreduce"] == 0
            assert stats[step]["comm_bytes/uncompressed"] == MLP_PARAMS * 4
            assert stats[step]["comm_s/torch_powersgd"] > 0
    for name, param in results[0][1].items():  # the ranks stay in sync
        assert torch.equal(param, results[1][1][name])


def _bench(rank, world_size):
    return run_allreduce_bench([1024, 64 * 1024], iters=3, warmup=1)


@pytest.mark.slow
def test_allreduce_bench_on_gloo():
    rows = run_ranks(_bench, WORLD)
    assert rows[0] == rows[1]  # the slowest rank's time is reported everywhere
    for row in rows[0]:
        assert row["world_size"] == 2 and row["latency_s"] > 0
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 2 * (2 - 1) / 2)
    assert [row["bytes"] for row in rows[0]] == [1024, 65536]
