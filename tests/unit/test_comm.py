"""Communicator accounting, the one-process no-op path, the simulated-ranks fake, the bench helpers."""

from __future__ import annotations

import pickle

import pytest
import torch

from bigbatch.distributed.allreduce_bench import format_table, parse_size, run_allreduce_bench
from bigbatch.comm import Communicator, LocalGroup, run_local


def test_one_process_collectives_are_free_noops():
    comm = Communicator()  # no process group initialised in this test process
    assert (comm.size, comm.rank) == (1, 0)
    t = torch.arange(4.0)
    assert comm.all_reduce(t, "grad_allreduce") is t
    assert comm.all_reduce(t, "grad_allreduce", op="sum", async_op=True).wait() is t
    assert comm.broadcast(t, src=0) is t
    assert comm.all_gather(t)[0] is t
    comm.barrier()
    comm.add_uncompressed(1000)
    torch.testing.assert_close(t, torch.arange(4.0), rtol=0, atol=0)
    stats = comm.take_step_stats()
    # Every kind is listed (stable metric columns) and everything is exactly zero: nothing was sent.
    assert stats["comm_bytes/grad_allreduce"] == 0.0 and stats["comm_s/grad_allreduce"] == 0.0
    assert stats["comm_bytes/total"] == 0.0 and stats["comm_bytes/uncompressed"] == 0.0
    assert "comm_bytes/broadcast" in stats and "comm_bytes/all_gather" in stats


def _collectives(comm):
    value = float(comm.rank + 1)  # ranks hold 1, 2, 3
    avg = comm.all_reduce(torch.full((4,), value), "grads")  # 4 float32 = 16 bytes per call
    total = comm.all_reduce(torch.full((4,), value), "grads", op="sum")
    top = comm.all_reduce(torch.full((4,), value), "metrics", op="max")
    future = comm.all_reduce(torch.full((4,), value), "grads", async_op=True)
    gathered = comm.all_gather(torch.tensor([value]))
    bcast = comm.broadcast(torch.tensor([value]), src=2)
    comm.barrier()
    comm.add_uncompressed(64)
    return avg, total, top, future.wait(), gathered, bcast, comm.take_step_stats()


def test_local_group_reduces_and_counts_like_a_process_group():
    for avg, total, top, fut, gathered, bcast, stats in run_local(_collectives, 3):
        assert torch.equal(avg, torch.full((4,), 2.0))  # (1 + 2 + 3) / 3
        assert torch.equal(total, torch.full((4,), 6.0))
        assert torch.equal(top, torch.full((4,), 3.0))
        assert torch.equal(fut, torch.full((4,), 2.0))
        assert [g.item() for g in gathered] == [1.0, 2.0, 3.0]
        assert bcast.item() == 3.0
        assert stats["comm_bytes/grads"] == 3 * 16  # three calls of 16 bytes, per rank
        assert stats["comm_bytes/metrics"] == 16
        assert stats["comm_bytes/all_gather"] == 4 and stats["comm_bytes/broadcast"] == 4
        assert stats["comm_bytes/barrier"] == 0
        assert stats["comm_bytes/total"] == 48 + 16 + 4 + 4
        assert stats["comm_bytes/uncompressed"] == 64
        assert stats["comm_s/grads"] >= 0.0


def _two_steps(comm):
    comm.all_reduce(torch.ones(8), "a")  # 32 bytes
    comm.all_reduce(torch.ones(8), "a")
    first = comm.take_step_stats()
    comm.all_reduce(torch.ones(2, dtype=torch.float64), "b")  # 16 bytes
    comm.add_uncompressed(100)
    return first, comm.take_step_stats(), comm.totals()


def test_step_stats_reset_and_totals_accumulate():
    first, second, totals = run_local(_two_steps, 2)[0]
    assert first["comm_bytes/a"] == 64 and first["comm_bytes/uncompressed"] == 0
    assert second["comm_bytes/a"] == 0 and second["comm_s/a"] == 0  # reset, but still reported
    assert second["comm_bytes/b"] == 16 and second["comm_bytes/uncompressed"] == 100
    assert totals["comm_bytes/a"] == 64 and totals["comm_bytes/b"] == 16
    assert totals["comm_bytes/total"] == 80 and totals["comm_bytes/uncompressed"] == 100


def test_bad_arguments_are_rejected():
    comm = Communicator()
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(torch.ones(2), "x", op="mean")
    with pytest.raises(ValueError, match="floating-point"):
        comm.all_reduce(torch.ones(2, dtype=torch.int64), "x")
    with pytest.raises(ValueError):
        LocalGroup(0)


def _fail_on_rank_one(comm):
    if comm.rank == 1:
        raise ValueError("boom")
    comm.all_reduce(torch.ones(1), "x")  # would wait for rank 1 forever without the abort


def test_a_failing_simulated_rank_fails_fast_instead_of_hanging():
    with pytest.raises(RuntimeError, match="rank 1 failed: ValueError"):
        run_local(_fail_on_rank_one, 2, timeout_s=30)


def test_communicator_pickles_without_its_group():
    comm = Communicator(group=object())  # stands in for an unpicklable ProcessGroup
    comm.record("x", 10, 0.5)
    restored = pickle.loads(pickle.dumps(comm))
    assert restored.group is None
    assert restored.totals()["comm_bytes/x"] == 10
    restored.record("x", 5)
    assert restored.take_step_stats()["comm_bytes/x"] == 15


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096),
    ("64K", 64 * 2**10),
    ("16M", 16 * 2**20),
    ("16mb", 16 * 2**20),
    ("1GiB", 2**30),
    ("1.5K", 1536),
    (512, 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "16X", "M", "-1K"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size(text)


def test_format_table_aligns_rows():
    rows = [{"bytes": 2**20, "world_size": 2, "latency_s": 1e-3, "algbw_GBps": 1.048576,
             "busbw_GBps": 1.048576}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["size", "bytes", "ranks", "latency_us", "algbw_GB/s", "busbw_GB/s"]
    assert lines[1].split() == ["1M", "1048576", "2", "1000.0", "1.049", "1.049"]
    assert len(set(map(len, lines))) == 1
    assert len(format_table([]).splitlines()) == 1


def test_bench_runs_in_one_process():
    rows = run_allreduce_bench([1024, 4096], iters=2, warmup=1)
    assert [r["bytes"] for r in rows] == [1024, 4096]
    assert all(r["world_size"] == 1 and r["busbw_GBps"] == 0.0 for r in rows)  # 2(N-1)/N = 0
