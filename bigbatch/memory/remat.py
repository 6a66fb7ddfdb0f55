"""Activation rematerialization: run chosen blocks under `torch.utils.checkpoint`.

`apply_remat(model, policy, k)` acts on `model.blocks`, the nn.ModuleList of units every built-in
model (gpt, resnet, mlp) exposes:

| policy      | blocks wrapped           | kept for backward per wrapped block                          |
|-------------|--------------------------|--------------------------------------------------------------|
| `none`      | none                     | everything autograd saves (nothing changes)                  |
| `full`      | all                      | the block's input; the whole block is recomputed in backward  |
| `every_k`   | 0, k, 2k, … (i % k == 0) | as `full` for those blocks, as `none` for the others          |
| `selective` | all                      | the input, plus outputs of matmul-like ops (mm, addmm, bmm,   |
|             |                          | linear, convolution, fused attention); element-wise work,     |
|             |                          | norms and the attention softmax are recomputed                |

`selective` uses torch's selective activation checkpointing
(`create_selective_checkpoint_contexts`): the policy returns MUST_SAVE for the ops above and
PREFER_RECOMPUTE for everything else. Cached outputs live outside autograd, so the policy also reports
them to `bigbatch.memory.activation.record_saved` to keep measured bytes honest.

How blocks are wrapped: the block's `forward` is replaced by a method bound to that block (an
instance attribute), which calls the class's forward under `checkpoint(..., use_reentrant=False)`.
No module is inserted, so `state_dict()` keys are unchanged and checkpoints load with or without
remat; `copy.deepcopy` re-binds the method to the copy. Calling `apply_remat` again replaces the
earlier policy (`none` removes it).

Exactness: recomputation replays the RNG (checkpoint's `preserve_rng_state`), so dropout masks match,
and norm layers update scratch tensors instead of their running statistics while recomputing, so
BatchNorm statistics move once per forward, exactly as without remat. Gradients equal those without remat.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from bigbatch.memory.activation import record_saved

POLICIES = ("none", "full", "every_k", "selective")

# Ops whose outputs selective remat keeps (the expensive ones to recompute). Looked up by name so a
# torch without one of the fused attention kernels still imports this module.
_SAVE_OP_NAMES = (
    "mm.default", "addmm.default", "bmm.default", "baddbmm.default", "linear.default",
    "convolution.default",
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
)


def _resolve_ops(names: tuple[str, ...]) -> frozenset:
    ops = []
    for name in names:
        packet_name, overload = name.split(".")
        packet = getattr(torch.ops.aten, packet_name, None)
        if packet is not None and hasattr(packet, overload):
            ops.append(getattr(packet, overload))
    return frozenset(ops)


SELECTIVE_SAVE_OPS = _resolve_ops(_SAVE_OP_NAMES)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in SELECTIVE_SAVE_OPS:
        if not ctx.is_recompute:
            # Older torch has no op_output; the meter then misses this cache (undercounts).
            record_saved(getattr(ctx, "op_output", None))
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_selective_policy)


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _scratch_running_stats(module: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Zero tensors shaped like the running statistics of every norm layer in `module` that
    updates them (BatchNorm, InstanceNorm with track_running_stats, in training mode)."""
    norms = [m for m in module.modules()
             if getattr(m, "track_running_stats", False) and m.training
             and isinstance(getattr(m, "running_mean", None), torch.Tensor)]
    return [(norm, {name: torch.zeros_like(getattr(norm, name)) for name in _RUNNING_STATS
                    if isinstance(getattr(norm, name, None), torch.Tensor)}) for norm in norms]


@contextlib.contextmanager
def _swapped_buffers(swaps: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> Iterator[None]:
    """Let the listed modules use other tensors as these buffers; by attribute, no tensor op runs."""
    originals = [(module, {name: getattr(module, name) for name in tensors}) for module, tensors in swaps]
    for module, tensors in swaps:
        for name, tensor in tensors.items():
            setattr(module, name, tensor)
    try:
        yield
    finally:
        for module, tensors in originals:
            for name, tensor in tensors.items():
                setattr(module, name, tensor)


def _remat_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Replaces `forward` on a wrapped block; `self._remat_policy` is `full` or `selective`."""
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
        return forward(*args, **kwargs)
    calls, scratch = 0, []

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        nonlocal calls, scratch
        calls += 1
        if calls == 1:  # the real forward
            scratch = _scratch_running_stats(self)
            return forward(*inner_args, **inner_kwargs)
        # Recomputation in backward: norm layers update scratch statistics, so the real ones move
        # once per forward. Made in the forward and swapped in by attribute because selective
        # remat's recomputation may only run ops that the forward ran. In training mode a norm's
        # output does not depend on its running statistics.
        with _swapped_buffers(scratch):
            return forward(*inner_args, **inner_kwargs)

    if self._remat_policy == "selective":
        return checkpoint(run, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def _unwrap(block: nn.Module) -> None:
    installed = block.__dict__.get("forward")
    if getattr(installed, "__func__", None) is _remat_forward:
        del block.__dict__["forward"]
        del block._remat_policy


def wrapped_indices(n_blocks: int, policy: str, k: int = 2) -> list[int]:
    """Indices of the blocks `policy` runs under checkpoint."""
    if policy == "none":
        return []
    if policy == "every_k":
        return list(range(0, n_blocks, k))
    return list(range(n_blocks))


def check_policy(policy: str, k: int = 2) -> None:
    if policy not in POLICIES:
        raise ValueError(f"remat.policy: unknown '{policy}'; choose one of {', '.join(POLICIES)}")
    if policy == "every_k" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"remat.k: must be a positive integer for remat.policy every_k, got {k!r}")


def apply_remat(model: nn.Module, policy: str, k: int = 2) -> nn.Module:
    """Rematerialize `model.blocks` under `policy` (see the module doc); returns `model`, changed in place."""
    check_policy(policy, k)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        if policy == "none":
            return model
        raise ValueError(f"remat.policy: '{policy}' needs a model with a `blocks` nn.ModuleList (the "
                         f"units to recompute); {type(model).__name__} has none. Set remat.policy: "
                         f"none, or give the model a `blocks` ModuleList")
    mode = "selective" if policy == "selective" else "full"
    wrapped = set(wrapped_indices(len(blocks), policy, k))
    for i, block in enumerate(blocks):
        _unwrap(block)
        if i in wrapped:
            block._remat_policy = mode
            block.forward = types.MethodType(_remat_forward, block)
    return model
