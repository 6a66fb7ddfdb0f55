"""Every collective bigbatch issues, with the bytes and seconds it cost, per kind.

`Communicator(group)` wraps torch.distributed for one process group. Each call names a *kind*
(`grad_allreduce`, `powersgd_p`, `metrics`, ...) and the communicator adds to that kind:

- bytes: the payload handed to the collective on this rank, `numel * element_size` (what nccl-tests
  calls the message size; the wire traffic of a ring all-reduce is about 2(N-1)/N times that);
- seconds: host wall time from issuing the call until its result is usable. A blocking call on CUDA
  returns once the work is enqueued, so pass `synchronize_cuda=True` to time completed transfers
  (it costs overlap); an async call is timed until its future completes.

`add_uncompressed(nbytes)` records what a plain all-reduce of the same gradients would have moved, so
`comm_bytes/uncompressed` over the gradient kinds gives the compression saving.
`take_step_stats()` returns and resets the per-step sums; `totals()` the cumulative ones. A kind, once
seen, is reported every step (zero when unused) so metric columns stay stable.

With one process, or no process group at all, every collective is a no-op that records zero bytes and
zero seconds: single-process training pays nothing.

For unit tests, `LocalGroup(n)` simulates n ranks in one process, one thread per rank, each with a
`LocalCommunicator` that has the same interface and accounting. Code written against `Communicator`
(the compressors, DiLoCo) then runs unchanged, rank by rank, exactly as it would on n processes:
`run_local(fn, n, *args)` calls `fn(comm, *args)` on every simulated rank and returns the results in
rank order. Reductions sum in rank order, so with two ranks they are bitwise equal to gloo's.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

REDUCE_OPS = ("avg", "sum", "max", "min")
_DIST_OPS = {"avg": "SUM", "sum": "SUM", "max": "MAX", "min": "MIN"}


def completed_future(value: Any) -> Future:
    """A torch Future that already holds `value`."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


def _payload_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Communicator:
    """Collectives over `group` (None: the default world group) with per-kind byte/time accounting."""

    def __init__(self, group: Any = None, synchronize_cuda: bool = False):
        self.group = group
        self.synchronize_cuda = synchronize_cuda
        self._lock = threading.Lock()  # async completions are recorded from the backend's threads
        self._step: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [bytes, s]
        self._total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._uncompressed = [0.0, 0.0]  # [this step, cumulative]
        self._untimed: set[str] = set()  # kinds counted without a clock

    # -- pickling: like torch's PowerSGDState, drop the process group (it cannot be pickled) --------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["group"] = None
        del state["_lock"]
        state["_step"], state["_total"] = dict(self._step), dict(self._total)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_untimed", set())
        self._lock = threading.Lock()
        self._step = defaultdict(lambda: [0.0, 0.0], state["_step"])
        self._total = defaultdict(lambda: [0.0, 0.0], state["_total"])

    # -- who we are ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    # -- accounting ----------------------------------------------------------------------------
    def record(self, kind: str, nbytes: float, seconds: float | None = 0.0) -> None:
        """Add bytes and seconds to `kind` (used by the collectives, and by hooks that count
        analytically, such as the torch PowerSGD baseline). `seconds=None`: a collective bigbatch
        counts but cannot time (DDP's own all-reduce); its kind reports no `comm_s/<kind>`."""
        with self._lock:
            if seconds is None:
                self._untimed.add(kind)
                seconds = 0.0
            for table in (self._step, self._total):
                entry = table[kind]
                entry[0] += nbytes
                entry[1] += seconds

    def add_uncompressed(self, nbytes: float) -> None:
        """Record the bytes a plain all-reduce of the gradients just reduced would have moved."""
        if self.size == 1:
            nbytes = 0  # nothing would have been sent either
        with self._lock:
            self._uncompressed[0] += nbytes
            self._uncompressed[1] += nbytes

    def take_step_stats(self) -> dict[str, float]:
        """`comm_bytes/<kind>`, `comm_s/<kind>`, totals and `comm_bytes/uncompressed` since the last
        call; resets them."""
        with self._lock:
            stats = self._format(self._step, self._uncompressed[0], self._untimed)
            for entry in self._step.values():
                entry[0] = entry[1] = 0.0
            self._uncompressed[0] = 0.0
        return stats

    def totals(self) -> dict[str, float]:
        """The same keys as `take_step_stats`, accumulated since construction."""
        with self._lock:
            return self._format(self._total, self._uncompressed[1], self._untimed)

    @staticmethod
    def _format(table: dict[str, list[float]], uncompressed: float, untimed: set[str]) -> dict[str, float]:
        stats: dict[str, float] = {}
        for kind in sorted(table):
            stats[f"comm_bytes/{kind}"] = float(table[kind][0])
            if kind not in untimed:
                stats[f"comm_s/{kind}"] = float(table[kind][1])
        stats["comm_bytes/total"] = float(sum(entry[0] for entry in table.values()))
        stats["comm_s/total"] = float(sum(entry[1] for entry in table.values()))
        stats["comm_bytes/uncompressed"] = float(uncompressed)
        return stats

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce(self, tensor: Tensor, kind: str, op: str = "avg",
                   async_op: bool = False) -> Tensor | Future:
        """Reduce `tensor` in place across the group. `avg` sums, then divides by the group size
        (gloo has no AVG). With `async_op=True`, returns a Future whose value is `tensor` once
        reduced (and divided)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")
        if op == "avg" and not tensor.is_floating_point():
            raise ValueError(f"all_reduce op 'avg' needs a floating-point tensor, got {tensor.dtype}")
        size = self.size
        if size == 1:
            self.record(kind, 0, 0.0)
            return completed_future(tensor) if async_op else tensor
        nbytes, start = _payload_bytes(tensor), time.perf_counter()

        def finish(done: Future | None = None) -> Tensor:
            if done is not None:
                done.value()  # re-raises a failed collective into the returned future
            if op == "avg":
                tensor.div_(size)
            if not async_op:
                self._maybe_synchronize(tensor)
            self.record(kind, nbytes, time.perf_counter() - start)
            return tensor

        work = self._all_reduce(tensor, op, async_op)
        return work.get_future().then(finish) if async_op else finish()

    def all_gather(self, tensor: Tensor, kind: str = "all_gather") -> list[Tensor]:
        """Every rank's `tensor` (same shape on all ranks), in group-rank order."""
        if self.size == 1:
            self.record(kind, 0, 0.0)
            return [tensor]
        start = time.perf_counter()
        gathered = self._all_gather(tensor)
        self._maybe_synchronize(tensor)
        self.record(kind, _payload_bytes(tensor), time.perf_counter() - start)
        return gathered

    def broadcast(self, tensor: Tensor, src: int, kind: str = "broadcast") -> Tensor:
        """Copy group rank `src`'s `tensor` into `tensor` on every rank (in place)."""
        if self.size == 1:
            self.record(kind, 0, 0.0)
            return tensor
        start = time.perf_counter()
        self._broadcast(tensor, src)
        self._maybe_synchronize(tensor)
        self.record(kind, _payload_bytes(tensor), time.perf_counter() - start)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank; the time is recorded under kind `barrier`, with zero bytes."""
        if self.size == 1:
            return
        start = time.perf_counter()
        self._barrier()
        self.record("barrier", 0, time.perf_counter() - start)

    # -- transport: torch.distributed (LocalCommunicator replaces these four) -------------------
    def _all_reduce(self, tensor: Tensor, op: str, async_op: bool) -> Any:
        reduce_op = getattr(dist.ReduceOp, _DIST_OPS[op])
        return dist.all_reduce(tensor, op=reduce_op, group=self.group, async_op=async_op)

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(gathered, tensor, group=self.group)
        return gathered

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        global_src = src if self.group is None else dist.get_global_rank(self.group, src)
        dist.broadcast(tensor, src=global_src, group=self.group)

    def _barrier(self) -> None:
        dist.barrier(group=self.group)

    def _maybe_synchronize(self, tensor: Tensor) -> None:
        if self.synchronize_cuda and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)


class _DoneWork:
    """Stands in for a torch.distributed Work whose collective already finished."""

    def __init__(self, tensor: Tensor):
        self._future = completed_future([tensor])

    def get_future(self) -> Future:
        return self._future

    def wait(self) -> bool:
        return True


class LocalGroup:
    """`world_size` simulated ranks in one process; each rank runs in its own thread.

    A collective blocks until every rank has called it (a thread barrier), so the ranks must issue
    the same collectives in the same order, exactly as with real process groups. A rank that fails
    breaks the barrier and the others fail fast instead of hanging.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout_s)
        self._slots: list[Any] = [None] * world_size

    def communicators(self) -> list["LocalCommunicator"]:
        return [LocalCommunicator(self, rank) for rank in range(self.world_size)]

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return values

    def abort(self) -> None:
        self._barrier.abort()


class LocalCommunicator(Communicator):
    """A `Communicator` for one simulated rank of a `LocalGroup` (same API, same accounting).

    Async collectives complete before they return. With a group of one it is a no-op, like the
    real communicator without a process group.
    """

    def __init__(self, local_group: LocalGroup, rank: int):
        super().__init__(group=None)
        self.local_group, self._rank = local_group, rank

    @property
    def size(self) -> int:
        return self.local_group.world_size

    @property
    def rank(self) -> int:
        return self._rank

    def _all_reduce(self, tensor: Tensor, op: str, async_op: bool) -> Any:
        values = self.local_group.exchange(self._rank, tensor.detach().clone())
        result = values[0].clone()
        for value in values[1:]:  # rank order: every rank computes the same bits
            if op in ("avg", "sum"):
                result += value
            else:
                result = torch.maximum(result, value) if op == "max" else torch.minimum(result, value)
        tensor.copy_(result)
        return _DoneWork(tensor) if async_op else None

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        return [v.clone() for v in self.local_group.exchange(self._rank, tensor.detach().clone())]

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        values = self.local_group.exchange(self._rank, tensor.detach().clone())
        tensor.copy_(values[src])

    def _barrier(self) -> None:
        self.local_group.exchange(self._rank, None)


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> list:
    """Run `fn(comm, *args)` on `world_size` simulated ranks (threads); return results by rank.

    The first exception raised by any rank is re-raised here (the others then fail on the broken
    barrier and are not reported).
    """
    group = LocalGroup(world_size, timeout_s)
    comms = group.communicators()
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def main(rank: int) -> None:
        try:
            results[rank] = fn(comms[rank], *args)
        except BaseException as exc:  # hand it to the caller; unblock the other ranks
            errors.append((rank, exc))
            group.abort()

    threads = [threading.Thread(target=main, args=(rank,), name=f"local-rank-{rank}")
               for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        first = next((e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)),
                     errors[0])
        raise RuntimeError(f"simulated rank {first[0]} failed: {first[1]!r}") from first[1]
    return results
