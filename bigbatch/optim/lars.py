"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017), with LARC's clipping mode.

For every parameter tensor w with gradient g in a group with learning rate lr, momentum μ and
weight decay λ:

    local_lr = η·‖w‖ / (‖g‖ + λ·‖w‖ + eps)      η = trust_coefficient
    local_lr = 1                                 when ‖w‖ = 0 or ‖g‖ = 0 (so zero-initialised
                                                 tensors still move, like plain SGD)
    clip=True (LARC "clip" mode):  local_lr = min(local_lr / lr, 1)   (only where the ratio was
                                                 computed; the fallback 1 stays 1)
    d   = local_lr · (g + λ·w)
    buf = μ·buf + d                              (first step: buf = d; μ = 0: buf = d, no state kept)
    nesterov:  u = d + μ·buf        else  u = buf
    w  -= lr · u

so the effective step of a tensor is lr·local_lr, i.e. LR·η·‖w‖/‖g‖ when weight decay is 0.

Param groups with ``exclude_from_adaptation=True`` (biases and normalisation weights, see
``bigbatch.optim.factory.param_groups``) skip the trust ratio: local_lr = 1, which is plain momentum
SGD with the group's own ``weight_decay`` (the factory sets it to 0 for those groups).

Sharded parameters (``norm_fn``)
--------------------------------
The trust ratio needs the norm of the *whole* tensor. When a strategy shards tensors over ranks
(ZeRO, FSDP) each rank holds only a slice, so pass ``norm_fn``: a callable that takes a list of
tensors and returns a 1-D tensor with one L2 norm per input, in order. The default computes local
norms (``torch._foreach_norm``). A sharded version all-reduces the squared norms over the shard
group, e.g.::

    def sharded_norms(tensors):
        sq = torch.stack(torch._foreach_norm(tensors)) ** 2     # local squared norms (fp32+)
        dist.all_reduce(sq, group=shard_group)
        return sq.sqrt()

``norm_fn`` is called with ``params + grads`` of one (group, device, dtype) bucket in the default and
the multi-tensor (``foreach=True``) paths, and with ``[w, g]`` of one tensor at a time in the
per-parameter path (``foreach=False``), so it sees the same sequence of calls on every rank as long as every rank steps the same parameters
(a rank whose shard of a tensor is empty must still pass the empty tensor with an empty gradient).
It can be given to the constructor or set later with :meth:`LARS.set_norm_fn`; it is not part of
``state_dict``. Norms of half-precision tensors are computed in float32 by the default.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from bigbatch.optim.layerwise import (LayerwiseOptimizer, NormFn, group_by_device_dtype,  # noqa: F401
                                       local_norms, ratio_or_one)

class LARS(LayerwiseOptimizer):
    """LARS / LARC; see the module docstring for the exact update and the ``norm_fn`` hook.

    Args:
        params: tensors or param groups; a group may set ``exclude_from_adaptation=True``.
        lr: global learning rate (the trainer overwrites ``group['lr']`` every step).
        momentum: heavy-ball momentum μ (0 disables the buffer).
        weight_decay: L2 penalty λ, added to the gradient before the trust ratio is applied.
        trust_coefficient: η in the trust ratio.
        eps: added to the trust-ratio denominator.
        nesterov: Nesterov momentum.
        clip: LARC clipping, local_lr = min(local_lr / lr, 1).
        foreach: None (default): tensor at a time on CPU, multi-tensor elsewhere; True: the
            multi-tensor ``torch._foreach_*`` path; False: a simple per-parameter loop. May also be
            set per group.
        norm_fn: list of tensors -> 1-D tensor of their L2 norms (default: local norms).
    """

    GROUP_DEFAULTS = {"clip": False, "nesterov": False}

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, nesterov: bool = False,
                 clip: bool = False, foreach: Optional[bool] = None,
                 norm_fn: Optional[NormFn] = None) -> None:
        if lr < 0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient: must be > 0, got {trust_coefficient}")
        if eps < 0:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov: requires momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov, clip=clip,
                        foreach=foreach)
        super().__init__(params, defaults, norm_fn)

    # ------------------------------------------------------------------ shared pieces

    def _local_lr(self, group: dict, w_norm: Tensor, g_norm: Tensor) -> Tensor:
        """Trust ratio per tensor (1-D tensors of norms in, 1-D tensor of local LRs out)."""
        numerator = group["trust_coefficient"] * w_norm
        denom = g_norm + group["weight_decay"] * w_norm + group["eps"]
        local = ratio_or_one(numerator, denom, w_norm, g_norm)
        if group["clip"]:
            lr = float(group["lr"])
            computed = (w_norm > 0) & (g_norm > 0)
            clipped = torch.clamp(local / lr, max=1.0) if lr > 0 else torch.ones_like(local)
            local = torch.where(computed, clipped, local)
        return local

    # ------------------------------------------------------------------ per-parameter path

    def _single_update(self, group: dict, p: Tensor) -> None:
        g = p.grad
        wd, mu, lr = group["weight_decay"], group["momentum"], group["lr"]
        d = g.add(p, alpha=wd) if wd != 0 else g.clone()
        if not group["exclude_from_adaptation"]:
            norms = self.norm_fn([p, g])
            local = self._local_lr(group, norms[0:1], norms[1:2])[0]
            d.mul_(local.to(d.dtype))
        if mu != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.clone()
            else:
                buf.mul_(mu).add_(d)
            update = d.add(buf, alpha=mu) if group["nesterov"] else buf
        else:
            update = d
        p.add_(update, alpha=-lr)

    # ------------------------------------------------------------------ tensor-at-a-time path (CPU)

    def _tensorwise_update(self, group: dict, params: list[Tensor]) -> None:
        """Each tensor's update in place with its local LR as a Python float: no intermediate
        tensors, and g, w and the buffer stay in cache across the passes over one tensor. A norm_fn
        of its own is called once for the bucket, as in the multi-tensor path."""
        grads = [p.grad for p in params]
        wd, mu, lr = group["weight_decay"], group["momentum"], group["lr"]
        local_lrs = self._bucket_local_lrs(group, params, grads)
        for i, (p, g) in enumerate(zip(params, grads)):
            # Default norms: per tensor, right before its update, which then finds w and g in cache.
            local = local_lrs[i] if local_lrs is not None else self._local_lr_float(group, p, g)
            buf = self._momentum_step(p, g, local, wd, mu) if mu != 0 else None
            if buf is not None and not group["nesterov"]:
                p.add_(buf, alpha=-lr)
                continue
            # w -= lr·(d + μ·buf) with d = local·(g + λ·w), all from the old w: decay first.
            if wd != 0:
                p.mul_(1.0 - lr * local * wd)
            p.add_(g, alpha=-lr * local)
            if buf is not None:
                p.add_(buf, alpha=-lr * mu)

    def _bucket_local_lrs(self, group: dict, params: list[Tensor], grads: list[Tensor]):
        """Local LRs of a bucket from one norm_fn call, or None when each tensor's comes later from
        local norms (the default norm_fn)."""
        if group["exclude_from_adaptation"]:
            return [1.0] * len(params)
        if self.norm_fn is local_norms:
            return None
        n = len(params)
        norms = self.norm_fn(params + grads)
        return self._local_lr(group, norms[:n], norms[n:]).tolist()

    def _local_lr_float(self, group: dict, p: Tensor, g: Tensor) -> float:
        """`_local_lr` for one tensor, in Python floats (a handful of tiny tensor ops per tensor
        would cost more than the update itself)."""
        w_norm, g_norm = local_norms([p, g]).tolist()
        if not (w_norm > 0 and g_norm > 0):
            return 1.0
        local = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
        if group["clip"]:
            lr = float(group["lr"])
            return min(local / lr, 1.0) if lr > 0 else 1.0
        return local

    def _momentum_step(self, p: Tensor, g: Tensor, local: float, wd: float, mu: float) -> Tensor:
        """buf = μ·buf + local·(g + λ·w) in place (buf = local·(g + λ·w) on the first step)."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.mul(g, local)
        else:
            buf.mul_(mu).add_(g, alpha=local)
        if wd != 0:
            buf.add_(p, alpha=local * wd)
        return buf

    # ------------------------------------------------------------------ multi-tensor path

    def _foreach_update(self, group: dict, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        wd, mu, lr = group["weight_decay"], group["momentum"], group["lr"]
        d = list(torch._foreach_add(grads, params, alpha=wd)) if wd != 0 else [g.clone() for g in grads]
        if not group["exclude_from_adaptation"]:
            n = len(params)
            norms = self.norm_fn(params + grads)
            local = self._local_lr(group, norms[:n], norms[n:]).to(d[0].dtype)
            torch._foreach_mul_(d, list(local.unbind(0)))
        if mu != 0:
            old_bufs, old_d = [], []
            for p, di in zip(params, d):
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = di.clone()
                else:
                    old_bufs.append(state["momentum_buffer"])
                    old_d.append(di)
            if old_bufs:
                torch._foreach_mul_(old_bufs, mu)
                torch._foreach_add_(old_bufs, old_d)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if group["nesterov"]:
                torch._foreach_add_(d, bufs, alpha=mu)
                update = d
            else:
                update = bufs
        else:
            update = d
        torch._foreach_add_(params, update, alpha=-lr)
