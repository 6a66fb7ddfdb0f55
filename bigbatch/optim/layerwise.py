"""What LARS and LAMB share: whole-tensor norms (``norm_fn``), device/dtype buckets, the safe trust
ratio, and one `step` skeleton that dispatches to a multi-tensor or a per-parameter update."""

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
    dicts may lack) and implement `_init_state`, `_foreach_update` and `_single_update`."""

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
            if group["foreach"] is None or group["foreach"]:
                for bucket in group_by_device_dtype(params):
                    self._foreach_update(group, bucket)
            else:
                for p in params:
                    self._single_update(group, p)
        return loss
