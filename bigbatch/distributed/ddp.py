"""Data parallelism: the model replicated on every rank, gradients averaged once per optimizer step.

A strategy owns model wrapping and gradient sync. The trainer asks it for `sync_context(last)` around
each micro-batch's backward and for `all_reduce_mean` on scalars; with one process both are no-ops.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SingleProcess:
    """One rank: nothing to synchronise."""

    def __init__(self, model: nn.Module):
        self.model = self.module = model

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class DDPStrategy(SingleProcess):
    """torch DistributedDataParallel; gradient all-reduce on the last micro-batch only."""

    def __init__(self, model: nn.Module, device: torch.device, bucket_cap_mb: float):
        super().__init__(model)
        ids = [device.index] if device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb)
        self.world_size = dist.get_world_size()

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        # Accumulating micro-batches need no communication: DDP's no_sync() defers the all-reduce
        # to the last backward, which then averages the summed gradients once.
        return contextlib.nullcontext() if last_micro_step else self.model.no_sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor).div_(self.world_size)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor
