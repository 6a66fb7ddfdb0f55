"""Any `Compressor` as a DDP communication hook.

    names = param_names_by_id(model)                 # before wrapping, or ddp_model.module
    ddp_model = DistributedDataParallel(model, ...)
    register_compression_hook(ddp_model, compressor, Communicator(), names)

DDP calls the hook once per gradient bucket. The hook hands the compressor that bucket's gradients
as (parameter name, view into the bucket buffer) pairs, so the compressor's state is keyed by name
and survives DDP rebuilding its buckets after the first iteration, or a resume with another bucket
size. The compressor works in place on those views, i.e. on the bucket buffer itself, through
`compressor.reduce_async`; the hook returns its Future, resolving to the bucket buffer. NoCompression
and LowPrecision (`compressor.elementwise`) get the bucket buffer as one nameless tensor, unless an
observer is watching, issue one async all-reduce and return at once, so the transfer overlaps the rest
of backward as with DDP's own hooks; PowerSGD runs its two dependent all-reduces before returning (its
collectives are issued from the caller's thread, so every rank issues them in the same order).

Steps: after the bucket DDP reports as last of the iteration (`bucket.is_last()`), the hook calls
`compressor.end_step()`. Under gradient accumulation DDP runs no hook on `no_sync()` micro-batches,
so this is once per optimizer step; the trainer must not call `end_step()` itself.

The hook follows torch's convention: a state object plus a pure function `(state, bucket) -> Future`.
The state pickles without its process group (the `Communicator` drops it); the id -> name map only
means something in the process that built it.
"""

# No `from __future__ import annotations`: DDP checks that the hook's `bucket` annotation
# is the GradBucket class itself, not a string.

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.distributed import GradBucket
from torch.futures import Future

from bigbatch.compression.base import Compressor, flatten
from bigbatch.comm import Communicator


BUCKET_NAME = "<ddp bucket>"  # elementwise compressors keep no per-name state, so any name will do


def param_names_by_id(module: nn.Module) -> dict[int, str]:
    """`id(param) -> name` for a module's parameters (names as in `module.named_parameters()`)."""
    return {id(param): name for name, param in module.named_parameters()}


@dataclass
class CompressionHookState:
    compressor: Compressor
    comm: Communicator
    param_names: dict[int, str]
    # Sees each bucket's local (not yet averaged) gradients, e.g. for the gradient noise scale.
    observer: Optional[Callable[[list[torch.Tensor]], None]] = None


def compression_hook(state: CompressionHookState, bucket: GradBucket) -> Future[torch.Tensor]:
    """Average one bucket's gradients with `state.compressor`; see the module docstring."""
    if state.compressor.elementwise and not observing(state):
        return _reduce_whole_buffer(state, bucket)
    grads = bucket.gradients()
    names = []
    for param in bucket.parameters():
        name = state.param_names.get(id(param))
        if name is None:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} in DDP bucket {bucket.index()} "
                           "has no name; build param_names with param_names_by_id(ddp_model.module)")
        names.append(name)
    if state.observer is not None:
        state.observer(grads)
    reduced = state.compressor.reduce_async(list(zip(names, grads)), state.comm)
    if bucket.is_last():
        state.compressor.end_step()
    buffer = bucket.buffer()

    def write_back(done: Future) -> torch.Tensor:
        done.value()  # re-raise a failure
        flat = flatten(grads)  # a view of the buffer when the gradients are (as DDP makes them)
        if flat.data_ptr() != buffer.data_ptr():
            buffer.copy_(flat)
        return buffer

    return reduced.then(write_back)


def observing(state: CompressionHookState) -> bool:
    return state.observer is not None and getattr(state.observer, "enabled", True)


def _reduce_whole_buffer(state: CompressionHookState, bucket: GradBucket) -> Future[torch.Tensor]:
    """Elementwise compressors average the bucket buffer as one tensor: no names, no per-gradient
    views, fewer Python callbacks on the communication thread (the hook's cost under plain DDP)."""
    buffer = bucket.buffer()
    reduced = state.compressor.reduce_async([(BUCKET_NAME, buffer)], state.comm)
    if bucket.is_last():
        state.compressor.end_step()
    return reduced.then(functools.partial(_resolve_to, buffer))


def _resolve_to(buffer: torch.Tensor, done: Future) -> torch.Tensor:
    done.value()  # re-raise a failure
    return buffer


def register_compression_hook(ddp_model: nn.parallel.DistributedDataParallel, compressor: Compressor,
                              comm: Communicator, param_names: dict[int, str],
                              observer: Optional[Callable[[list[torch.Tensor]], None]] = None
                              ) -> CompressionHookState:
    """Make `ddp_model` average its gradients with `compressor`; returns the hook state."""
    state = CompressionHookState(compressor, comm, param_names, observer)
    ddp_model.register_comm_hook(state, compression_hook)
    return state
