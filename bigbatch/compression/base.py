"""The compressor interface, and the two lossless-or-nearly baselines.

A `Compressor` averages a list of named gradients across a `Communicator`'s group, in place and
possibly lossily: `reduce(named_grads, comm)`. It can be called once per optimizer step with every
gradient (manual use, DiLoCo pseudo-gradients) or once per DDP bucket (`ddp_hook`); either way the
caller advances its step with `end_step()` once per optimizer step (the DDP hook does this itself
after the last bucket). Its state is a plain dict keyed by parameter name, never by bucket.

Every compressor records, per call, the bytes a plain all-reduce of the same gradients would move
(`comm.add_uncompressed`), so the saving is `comm_bytes/uncompressed` over the bytes sent.
"""

from __future__ import annotations

import abc
import functools
from collections import defaultdict
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.futures import Future

from bigbatch.comm import Communicator, completed_future

NamedGrads = Sequence[tuple[str, Tensor]]


def payload_bytes(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adjacent_span(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view covering `tensors` if they lie back to back in one storage (as DDP bucket
    gradients do), else None."""
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    expected = offset
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.device != first.device
                or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != expected):
            return None
        expected += t.numel()
    return first.as_strided((expected - offset,), (1,), offset)


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One flat buffer holding `tensors` (same dtype and device): a view when they are already back
    to back in memory, a copy otherwise. Write results back with `unflatten_into`."""
    span = _adjacent_span(tensors)
    return span if span is not None else torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy `flat` back into `tensors` (nothing to do when `flat` is a view over them)."""
    span = _adjacent_span(tensors)
    if span is not None and span.data_ptr() == flat.data_ptr():
        return
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def group_by_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    """`tensors` split by (device, dtype), each group in the given order (flat buffers need one)."""
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return list(groups.values())


def all_done(futures: Sequence[Future]) -> Future:
    """A Future that completes when all `futures` have, failing if any failed."""
    if not futures:
        return completed_future(None)
    return torch.futures.collect_all(list(futures)).then(_raise_failures)


def _raise_failures(done: Future) -> None:
    for future in done.value():
        future.value()


def all_reduce_flat_async(tensors: Sequence[Tensor], comm: Communicator, kind: str) -> Future:
    """Start averaging `tensors`, one all-reduce per (device, dtype) of a flat buffer; the Future
    completes once the results are back in `tensors`."""
    tensors = [t for t in tensors if t.numel() > 0]
    if len(tensors) == 1 and tensors[0].is_contiguous():  # e.g. a whole DDP bucket: no unflatten step
        return comm.all_reduce(tensors[0], kind, op="avg", async_op=True)
    futures = []
    for group in group_by_dtype(tensors):
        flat = flatten(group)
        futures.append(comm.all_reduce(flat, kind, op="avg", async_op=True).then(
            functools.partial(_unflatten_done, group)))
    return all_done(futures)


def _unflatten_done(group: list[Tensor], done: Future) -> None:
    unflatten_into(done.value(), group)


def all_reduce_flat(tensors: Sequence[Tensor], comm: Communicator, kind: str) -> None:
    """Average `tensors` with one all-reduce per (device, dtype) of a flat buffer."""
    all_reduce_flat_async(tensors, comm, kind).wait()


class Compressor(abc.ABC):
    """Averages gradients across a communicator's group, in place, possibly lossily."""

    # True when each output entry depends only on that entry's values across ranks (plain or
    # low-precision averaging): a DDP bucket's flat buffer can then be reduced as one nameless tensor.
    elementwise = False

    def __init__(self) -> None:
        self.step = 0  # optimizer steps completed; advanced by `end_step`

    @abc.abstractmethod
    def reduce(self, named_grads: NamedGrads, comm: Communicator) -> None:
        """Replace every gradient by (an approximation of) its average over the group."""

    def reduce_async(self, named_grads: NamedGrads, comm: Communicator) -> Future:
        """Start `reduce`; the Future completes once the gradients hold the result.

        This default runs `reduce` to completion. Compressors whose work is one collective override
        it, so a DDP hook returns at once and the transfer overlaps the rest of backward.
        """
        self.reduce(named_grads, comm)
        return completed_future(None)

    def end_step(self) -> None:
        """Mark the end of an optimizer step (called once per step, not per bucket)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class NoCompression(Compressor):
    """Plain averaging: one all-reduce of all the gradients in one flat buffer (`grad_allreduce`)."""

    kind = "grad_allreduce"
    elementwise = True

    def reduce(self, named_grads: NamedGrads, comm: Communicator) -> None:
        self.reduce_async(named_grads, comm).wait()

    def reduce_async(self, named_grads: NamedGrads, comm: Communicator) -> Future:
        grads = [g for _, g in named_grads]
        comm.add_uncompressed(payload_bytes(grads))
        return all_reduce_flat_async(grads, comm, self.kind)


class LowPrecision(Compressor):
    """Cast to float16 or bfloat16, all-reduce, cast back (kind `grad_allreduce_fp16` / `_bf16`).

    float16 tops out at 65504, so its inputs are divided by the group size before the cast and the
    sum cannot overflow where the average would not; bfloat16 has float32's range, so it sums first
    and divides after casting back, keeping the division in full precision.
    """

    _KINDS = {torch.float16: "grad_allreduce_fp16", torch.bfloat16: "grad_allreduce_bf16"}
    elementwise = True

    def __init__(self, dtype: torch.dtype = torch.float16):
        super().__init__()
        if dtype not in self._KINDS:
            raise ValueError(f"LowPrecision dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.dtype, self.kind = dtype, self._KINDS[dtype]

    def reduce(self, named_grads: NamedGrads, comm: Communicator) -> None:
        self.reduce_async(named_grads, comm).wait()

    def reduce_async(self, named_grads: NamedGrads, comm: Communicator) -> Future:
        grads = [g for _, g in named_grads if g.numel() > 0]
        comm.add_uncompressed(payload_bytes(grads))
        futures = []
        for group in group_by_dtype(grads):
            flat = flatten(group)
            if self.dtype == torch.float16:
                low = flat.div(comm.size).to(self.dtype)
            else:
                low = flat.to(self.dtype)
            futures.append(comm.all_reduce(low, self.kind, op="sum", async_op=True).then(
                functools.partial(self._cast_back, flat, group, comm.size)))
        return all_done(futures)

    def _cast_back(self, flat: Tensor, group: list[Tensor], size: int, done: Future) -> None:
        flat.copy_(done.value())
        if self.dtype == torch.bfloat16:
            flat.div_(size)
        unflatten_into(flat, group)
