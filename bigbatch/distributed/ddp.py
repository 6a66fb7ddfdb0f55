"""Data parallelism: the model replicated on every rank, gradients averaged once per optimizer step.

A strategy owns model wrapping and gradient sync. The trainer asks it for `sync_context(last)` around
each micro-batch's `backward(loss)`, for `optimizer_step(optimizer, grad_clip)` and for `all_reduce_*`
on scalars; with one process the context and the reductions are no-ops.
Under DDP every gradient bucket goes through bigbatch's communication hook, so the configured
compressor (fp16, bf16, PowerSGD) does the averaging and the Communicator counts every byte. Plain
averaging (none) is left to DDP's C++ all-reduce unless it is to be timed or watched; the strategy
then counts its bytes itself, untimed.
"""

from __future__ import annotations

import contextlib
import math
from typing import ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigbatch.compression.base import Compressor, NoCompression, payload_bytes
from bigbatch.compression.registry import gradient_kinds
from bigbatch.compression.ddp_hook import param_names_by_id, register_compression_hook
from bigbatch.compression.torch_powersgd import register_torch_powersgd
from bigbatch.comm import Communicator
from bigbatch.optim.factory import build_optimizer

GRADIENT_KINDS = gradient_kinds()  # every registered compressor's kinds (bigbatch.compression.registry)


class LocalGradNorm:
    """Sum of squared local gradient entries seen by the comm hook during one step (before averaging).

    Off until `enabled` is set (by the noise-scale monitor, its only reader): the sum is a pass over
    every gradient and a host sync per bucket, in the middle of backward."""

    def __init__(self) -> None:
        self.sq_sum = 0.0
        self.enabled = False

    def __call__(self, grads: list[torch.Tensor]) -> None:
        if self.enabled:
            self.sq_sum += float(sum(g.detach().float().square().sum() for g in grads))

    def take(self) -> float:
        value, self.sq_sum = self.sq_sum, 0.0
        return value


class SingleProcess:
    """One rank: nothing to synchronise."""

    world_size = 1
    global_grad_norm = True  # the norm optimizer_step returns is the same on every rank

    def __init__(self, model: nn.Module):
        self.model = self.module = model
        self.comm = Communicator()
        self.local_grad_norm = LocalGradNorm()
        self.compressor: Compressor | None = None

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        return contextlib.nullcontext()

    def build_optimizer(self, optim_cfg) -> torch.optim.Optimizer:
        """`optim.name` over the module's parameters; sharding strategies decide what it steps."""
        return build_optimizer(self.module, optim_cfg)

    def checkpoint_states(self, optimizer) -> dict:
        """The model/optimizer entries of replicated.pt (sharding strategies replace or drop them)."""
        return {"model": self.module, "optimizer": optimizer}

    def sharded_checkpoint(self, optimizer):
        """States every rank saves into step-N/ itself (DCP, DeepSpeed); None: all fit replicated.pt."""
        return None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> float:
        """Clip (when grad_clip is set) and step; returns the global gradient norm before clipping.
        A non-finite norm leaves the weights untouched (the trainer's guard skips the step).

        For sharded (DTensor) gradients clip_grad_norm_ already reduces over the shards."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        value = norm.item()
        if not math.isfinite(value):
            return value
        if grad_clip is not None:  # without clipping, skip clip's multiply by min(1, max/norm)
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        optimizer.step()
        return value

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def rank_states(self, model: nn.Module, optimizer) -> dict:
        """Statefuls each rank saves itself: the compressor's error feedback, when there is one."""
        return {"compression": self.compressor} if self.compressor else {}

    def after_step(self, trainer=None) -> dict:
        """Nothing to do after an optimizer step (DiLoCo's outer step lives here)."""
        return {}

    def comm_metrics(self, trainer=None) -> dict:
        """Bytes and seconds per collective kind this step, and the saving versus plain all-reduce."""
        return with_savings(self.comm.take_step_stats())


def with_savings(stats: dict) -> dict:
    """`stats` plus `comm_savings`: uncompressed gradient bytes over the bytes every registered
    gradient kind sent (absent while nothing was sent)."""
    sent = sum(stats.get(f"comm_bytes/{kind}", 0.0) for kind in GRADIENT_KINDS)
    if sent > 0:
        stats["comm_savings"] = stats["comm_bytes/uncompressed"] / sent
    return stats


class CommReductions:
    """Scalar all-reduces through the strategy's Communicator (counted under kind 'metrics')."""

    comm: Communicator

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(tensor, "metrics", op="sum")

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(tensor, "metrics", op="avg")

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(tensor, "metrics", op="max")


class DDPStrategy(CommReductions, SingleProcess):
    """torch DistributedDataParallel (with bigbatch's comm hook unless `native_allreduce`); gradients
    are averaged on the last micro-batch only."""

    def __init__(self, model: nn.Module, device: torch.device, bucket_cap_mb: float,
                 compressor: Compressor | None, torch_powersgd: dict | None = None,
                 native_allreduce: bool = False):
        super().__init__(model)
        ids = [device.index] if device.type == "cuda" else None
        # Gradients as views into DDP's buckets: no copy of every gradient into its bucket and back
        # each step (two passes over all gradients; 44.7 MB for ResNet-18), and no second copy in memory.
        self.model = DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb,
                                             gradient_as_bucket_view=True)
        self.world_size = self.comm.size
        self.compressor = compressor
        # Plain averaging left to DDP's C++ all-reduce: any Python comm hook (ours or torch's
        # allreduce_hook alike) costs ~2 ms per step (benchmarks/trainer_overhead.py). Its bytes are
        # known without a hook: every bucket, i.e. every gradient, once per synchronising backward.
        self.native_bytes = None
        if native_allreduce:
            if not isinstance(compressor, NoCompression):
                raise ValueError("native_allreduce: only plain averaging (compression.method none) can "
                                 "be left to DDP")
            self.native_bytes = payload_bytes([p for p in model.parameters() if p.requires_grad])
        elif torch_powersgd is not None:  # PyTorch's own hook, a peer baseline
            register_torch_powersgd(self.model, comm=self.comm, **torch_powersgd)
        else:
            register_compression_hook(self.model, compressor, self.comm, param_names_by_id(model),
                                      observer=self.local_grad_norm)

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        # Accumulating micro-batches need no communication: DDP's no_sync() defers the all-reduce
        # to the last backward, which then averages the summed gradients once.
        if not last_micro_step:
            return self.model.no_sync()
        if self.native_bytes is not None:  # this backward all-reduces every gradient in C++
            self.comm.record(self.compressor.kind, self.native_bytes, seconds=None)
            self.comm.add_uncompressed(self.native_bytes)
            self.compressor.end_step()
        return contextlib.nullcontext()
