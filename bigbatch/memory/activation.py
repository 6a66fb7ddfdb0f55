"""Bytes of activations that autograd keeps for backward, counted exactly.

    with SavedTensorMeter(model) as meter:
        loss = loss_fn(model(x), y)
    meter.bytes          # what this forward holds for backward
    loss.backward()      # outside the meter

What is counted
---------------
Every tensor that autograd saves for backward while the meter is active passes through its pack hook
(`torch.autograd.graph.saved_tensors_hooks`). The meter counts the *storage* behind each one, once:

- A storage is identified by (device, `untyped_storage().data_ptr()`) and counts
  `untyped_storage().nbytes()` bytes: the whole storage, because a saved view keeps all of it alive.
  A tensor saved by several ops, or several views of one storage (q, k and v sliced out of one qkv
  projection), count once.
- Parameters are not counted: they are held anyway and are not activations. A saved tensor is a
  parameter if its storage is that of a parameter or buffer of the `exclude` module (found by
  data_ptr; views such as the `W.t()` a linear layer saves share it), or if it is an
  `nn.Parameter` or a view of one (this also covers parameters outside `exclude`, e.g. the
  unsharded parameters FSDP gathers during the forward). Casts of a parameter (the bf16 copies
  autocast makes) are new storages and are counted: they stay alive until backward.
- Inputs that autograd saves are counted (token ids saved by an embedding, targets saved by the loss).
- Activation checkpointing (`torch.utils.checkpoint`, non-reentrant): checkpoint saves its region's
  inputs through the same pack hook, so they are counted. Inside the region checkpoint installs its
  own hooks, which keep nothing: those tensors are recomputed in backward and are not counted.
  Selective checkpointing keeps chosen op outputs in a cache outside autograd; `bigbatch.memory.remat`
  reports them with `record_saved`, so they are counted too.
- Tensors without a plain storage (sparse, some subclasses) count numel × element size, each
  tensor once.
- Not counted: tensors that are alive but not saved for backward (logits before the loss, the
  loss, gradients, optimizer state, autocast's weight-cast cache for recomputed regions, allocator
  caching and fragmentation).

The meter keeps a reference to every storage it counted until it exits, so an address that is freed
and reused during the forward is never mistaken for one already counted. Use it around the forward
(and loss) only; run backward after it exits. Meters nest: a tensor saved inside several active
meters is counted by each (the innermost hook counts for all).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

_local = threading.local()


def _active_meters() -> list["SavedTensorMeter"]:
    if not hasattr(_local, "meters"):
        _local.meters = []
    return _local.meters


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    try:
        return str(tensor.device), tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage: sparse, wrapper subclasses
        return "id", id(tensor)


def _is_parameter(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def record_saved(obj: Any) -> None:
    """Count the tensors in `obj` (a tensor or a nest of them) in every active meter.

    For tensors kept for backward outside autograd's saved-tensor mechanism, e.g. selective
    checkpointing's cache of op outputs. Does nothing when no meter is active.
    """
    for tensor in _tensors(obj):
        for meter in _active_meters():
            meter._add(tensor)


class SavedTensorMeter:
    """Context manager: bytes of distinct storages saved for backward inside it (see module doc).

    `exclude` is a module (its parameters and buffers are not activations) or an iterable of tensors.
    After exit, `bytes` and `count` keep their values; the storages themselves are released.
    """

    def __init__(self, exclude: Union[nn.Module, Iterable[torch.Tensor], None] = None):
        if isinstance(exclude, nn.Module):
            exclude = [*exclude.parameters(), *exclude.buffers()]
        self._exclude_tensors = list(exclude or [])
        self._excluded: set[tuple[str, int]] = set()
        self._seen: dict[tuple[str, int], Any] = {}  # key -> the storage (or tensor), kept alive
        self._hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None
        self.bytes = 0
        self.count = 0  # distinct storages counted

    def __enter__(self) -> "SavedTensorMeter":
        # Taken at entry: parameters may have moved device or been re-materialized since __init__.
        self._excluded = {_storage_key(t) for t in self._exclude_tensors}
        _active_meters().append(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        _active_meters().remove(self)
        self._seen.clear()

    def _add(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key in self._excluded or key in self._seen or _is_parameter(tensor):
            return
        if key[0] == "id":
            self._seen[key], nbytes = tensor, tensor.numel() * tensor.element_size()
        else:
            self._seen[key] = storage = tensor.untyped_storage()
            nbytes = storage.nbytes()
        self.bytes += nbytes
        self.count += 1


def _pack(tensor: torch.Tensor) -> torch.Tensor:
    for meter in _active_meters():
        meter._add(tensor)
    # A detached alias: same storage and version counter, but no reference back to the graph (a
    # saved output returned as-is would make a tensor -> grad_fn -> tensor cycle).
    return tensor.detach()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Put every buffer of `module` back to its value at entry (e.g. BatchNorm running statistics)."""
    saved = [(buf, buf.detach().clone()) for buf in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def measure_saved_bytes(model: nn.Module, inputs: Union[torch.Tensor, tuple],
                        loss_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> int:
    """Bytes saved for backward by one forward of `model` on `inputs` (in the model's mode).

    `inputs` is a tensor or a tuple of positional arguments; `loss_fn(output)`, if given, runs
    inside the meter too (a loss saves its own tensors, e.g. cross-entropy's log-softmax). No
    backward runs; the graph is freed on return. Side-effect free: buffers (BatchNorm running
    statistics) are restored and the RNG is forked, so measuring does not change training.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    devices = sorted({t.device.index or 0 for t in args
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), buffers_restored(model), torch.enable_grad():
        with SavedTensorMeter(model) as meter:
            out = model(*args)
            if loss_fn is not None:
                out = loss_fn(out)
        del out
    return meter.bytes
