"""What LARS and LAMB share: whole-tensor norms (``norm_fn``), device/dtype buckets, the safe trust
ratio, and one `step` skeleton that dispatches each (device, dtype) bucket to one of three updates:

- ``foreach=None`` (default): tensor at a time on CPU (`_tensorwise_update`, see `_tensorwise_ok`),
  multi-tensor elsewhere;
- ``foreach=True``: multi-tensor (`_foreach_update`), one ``norm_fn`` call per bucket;
- ``foreach=False``: the simple per-parameter reference loop (`_single_update`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

NormFn = Callable[[list[Tensor]], Tensor]


def local_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norm of each tensor (one device), as a 1-D tensor; float32 at least for half precision."""
    if not tensors:
        return torch.zeros(0)
    dtype = tensors[0].dtype
    norm_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=norm_dtype))


def group_by_device_dtype(params: list[Tensor]) -> list[list[Tensor]]:
    """Split `params` into buckets sharing device and dtype (foreach kernels need that), in order."""
    buckets: dict[tuple, list[Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return list(buckets.values())


def ratio_or_one(numerator: Tensor, denominator: Tensor, w_norm: Tensor, u_norm: Tensor) -> Tensor:
    """numerator / denominator where both ‖w‖ > 0 and ‖u‖ > 0, else 1 (elementwise, no NaNs)."""
    ok = (w_norm > 0) & (u_norm > 0)
    safe = torch.where(ok, denominator, torch.ones_like(denominator))
    return torch.where(ok, numerator / safe, torch.ones_like(numerator))


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Base of the layer-wise adaptive optimizers. Subclasses set GROUP_DEFAULTS (keys older state
    dicts may lack) and implement `_init_state`, `_foreach_update` and `_single_update`, and may
    override `_tensorwise_update` (default: the multi-tensor update)."""

    GROUP_DEFAULTS: dict = {}

    def __init__(self, params: Iterable, defaults: dict, norm_fn: Optional[NormFn]) -> None:
        super().__init__(params, {**defaults, "exclude_from_adaptation": False})
        self.norm_fn: NormFn = norm_fn if norm_fn is not None else local_norms

    def set_norm_fn(self, norm_fn: Optional[NormFn]) -> None:
        """Use `norm_fn` (list of tensors -> 1-D tensor of L2 norms) for the trust ratio; None = local."""
        self.norm_fn = norm_fn if norm_fn is not None else local_norms

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in {"foreach": None, "exclude_from_adaptation": False, **self.GROUP_DEFAULTS}.items():
                group.setdefault(key, value)

    def _init_state(self, group: dict, params: list[Tensor]) -> None:
        """Create or advance per-parameter state before an update (default: nothing)."""

    def _tensorwise_ok(self, params: list[Tensor]) -> bool:
        """Whether the default path may update this bucket one tensor at a time: on CPU, where
        host-side scalars are free and a tensor's intermediates stay in cache between passes. On
        accelerators the multi-tensor path avoids per-tensor kernel launches and host syncs."""
        return params[0].device.type == "cpu"

    def _tensorwise_update(self, group: dict, params: list[Tensor]) -> None:
        self._foreach_update(group, params)

    def _loop(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            self._single_update(group, p)

    def _scratch(self, like: Tensor, numel: int) -> Tensor:
        """A flat buffer of at least `numel` elements of `like`'s dtype and device, reused across
        steps (never part of the state dict)."""
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        key = (like.device, like.dtype)
        if key not in buffers or buffers[key].numel() < numel:
            buffers[key] = torch.zeros(numel, dtype=like.dtype, device=like.device)
        return buffers[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            self._init_state(group, params)
            if group["foreach"] is False:  # the simple per-parameter reference path
                self._loop(group, params)
                continue
            for bucket in group_by_device_dtype(params):
                if group["foreach"] is None and self._tensorwise_ok(bucket):
                    self._tensorwise_update(group, bucket)
                else:
                    self._foreach_update(group, bucket)
        return loss
