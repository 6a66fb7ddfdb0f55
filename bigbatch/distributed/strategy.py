"""The interface between the training loop and a parallelism strategy.

A strategy owns model wrapping and gradient sync; the loop and the checkpoint manager call only what
`Strategy` names. `SingleProcess` (bigbatch.distributed.ddp) implements it for one rank, and DDP,
ZeRO (zero1/zero2/zero3, DeepSpeed) and DiLoCo refine it. The per-step order the loop follows:

    for each micro-batch:  with sync_context(last): backward(loss / accum)
    all_reduce_mean(loss)                       # the guard's decision is the same on every rank
    optimizer_step(optimizer, grad_clip)        # or the step is skipped (non-finite)
    after_step()                                # every step, skipped or not: DiLoCo's outer step
    comm_metrics()                              # this step's bytes and seconds, outer step included
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol, runtime_checkable

import torch
from torch import nn

from bigbatch.comm import Communicator


@runtime_checkable
class ShardedCheckpoint(Protocol):
    """States every rank writes into step-N/ itself (torch DCP, DeepSpeed)."""

    def save(self, directory: Any) -> Any:
        """Write this rank's part; return its state dicts by name (checked for `finite`) or None."""

    def load(self, directory: Any) -> None: ...


@runtime_checkable
class Strategy(Protocol):
    model: nn.Module        # what forward runs: the DDP/FSDP/DeepSpeed wrapper, or the module itself
    module: nn.Module       # the bare model: state-dict keys, remat, activation metering
    comm: Communicator      # world collectives, counted by kind
    world_size: int
    compressor: Any         # the gradient Compressor whose state is per rank, or None
    global_grad_norm: bool  # optimizer_step's norm is the same on every rank (DiLoCo: per replica)

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        """Around one micro-batch's forward and backward: gradients sync on the last one only."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self, optimizer: Any, grad_clip: float | None) -> float:
        """Clip and step; returns the global gradient norm before clipping (non-finite: no step)."""

    def after_step(self) -> dict[str, float]:
        """After every optimizer step, taken or skipped; metrics of what it did (DiLoCo's outer step)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def build_optimizer(self, optim_cfg: Any) -> torch.optim.Optimizer:
        """`optim.name` over what this rank steps (whole model, or its shard)."""

    def checkpoint_states(self, optimizer: Any) -> dict[str, Any]:
        """Statefuls saved once, by rank 0, into replicated.pt."""

    def rank_states(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        """Statefuls every rank saves into its own rank-N.pt (besides its RNG streams)."""

    def sharded_checkpoint(self, optimizer: Any) -> ShardedCheckpoint | None:
        """States every rank writes itself (DCP, DeepSpeed); None when replicated.pt holds all."""

    def comm_metrics(self) -> dict[str, float]:
        """`comm_bytes/<kind>`, `comm_s/<kind>` and the savings of this step; resets the step sums."""
