"""A step's micro-batches on the device, optionally gathered one step ahead in a background thread.

The loop asks for the batches of the step that consumes stream positions [start, start + batch) in
micro-batches of `micro` (`take`), then names the step it expects next (`ahead`). `StepBatches`
gathers on demand; `PrefetchingBatches` gathers the named step in a worker thread while the current
step computes, and hands it over only when the next `take` asks for exactly that step. A wrong guess (the
adaptive batch grew, a rollback moved the position) is dropped and the step is gathered on demand, so
the batches are the same with and without prefetching: they are a function of the sampler's indices
alone. The sampler runs in the caller's thread (its permutation cache is not thread-safe); only
`split.batch` (reading and copying) runs in the worker, and numpy and torch release the GIL for it.

On CUDA the worker pins the batch and copies it with `non_blocking=True` on its own stream; `take`
makes the compute stream wait for that copy, and `record_stream` keeps the caching allocator from
reusing the memory while the compute stream still reads it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator, NamedTuple

import torch

from bigbatch.data.base import Split
from bigbatch.data.sampler import GlobalSampler

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class StepKey(NamedTuple):
    start: int   # stream position (samples seen before the step)
    batch: int   # global batch of the step
    micro: int   # per-rank micro-batch


class StepBatches:
    """Gathers a step's micro-batches when asked (data.prefetch: false)."""

    def __init__(self, split: Split, sampler: GlobalSampler, device: torch.device):
        self.split, self.sampler, self.device = split, sampler, device

    def chunks(self, key: StepKey) -> tuple[torch.Tensor, ...]:
        return self.sampler.rank_indices(key.start, key.batch).split(key.micro)

    def take(self, key: StepKey) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One micro-batch at a time: only the one in use is on the device."""
        return self._one_by_one(self.chunks(key))

    def _one_by_one(self, chunks: tuple[torch.Tensor, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for chunk in chunks:
            yield tuple(t.to(self.device) for t in self.split.batch(chunk))

    def ahead(self, key: StepKey) -> None:
        """The step expected next (a hint; nothing to do without prefetching)."""

    def close(self) -> None:
        pass


class PrefetchingBatches(StepBatches):
    """Gathers the step named by `ahead` in one worker thread (data.prefetch: true)."""

    def __init__(self, split: Split, sampler: GlobalSampler, device: torch.device):
        super().__init__(split, sampler, device)
        self.pool: ThreadPoolExecutor | None = None  # started by the first `ahead`, stopped by `close`
        self.pending: tuple[StepKey, Future] | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def ahead(self, key: StepKey) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigbatch-prefetch")
        self.pending = (key, self.pool.submit(self._gather, self.chunks(key)))

    def take(self, key: StepKey) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """The whole step at once when it was gathered ahead (its micro-batches are all on the device)."""
        pending, self.pending = self.pending, None
        if pending is None or pending[0] != key:  # no guess, or a wrong one: gather now
            if pending is not None:
                pending[1].cancel()
            return super().take(key)
        batches, copied = pending[1].result()  # a worker's exception surfaces here, at its step
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            for tensor in (t for pair in batches for t in pair):
                tensor.record_stream(current)
        return batches

    def _gather(self, chunks: tuple[torch.Tensor, ...]) -> tuple[Batches, torch.cuda.Event | None]:
        host = [self.split.batch(chunk) for chunk in chunks]
        if self.stream is None:
            return [tuple(t.to(self.device) for t in pair) for pair in host], None
        with torch.cuda.stream(self.stream):
            batches = [tuple(t.pin_memory().to(self.device, non_blocking=True) for t in pair) for pair in host]
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return batches, copied

    def close(self) -> None:
        """Stops the worker; a batch still being gathered is waited for and dropped."""
        self.pending = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def step_batches(split: Split, sampler: GlobalSampler, device: torch.device, prefetch: bool) -> StepBatches:
    return (PrefetchingBatches if prefetch else StepBatches)(split, sampler, device)
