"""LAMB: layer-wise adaptive moments (You et al. 2020, "Large Batch Optimization for Deep Learning").

For every parameter tensor w with gradient g, at step t (counted per tensor, from 1), in a group with
learning rate lr, betas (β1, β2), eps and weight decay λ:

    m = β1·m + (1−β1)·g                 v = β2·v + (1−β2)·g²
    m̂ = m / (1−β1^t)                    v̂ = v / (1−β2^t)      (bias_correction=False: m̂=m, v̂=v)
    u = m̂ / (√v̂ + eps) + λ·w            (decoupled weight decay inside the update, as in the paper)
    r = ‖w‖ / ‖u‖                       (r = 1 when ‖w‖ = 0 or ‖u‖ = 0, so zero-initialised tensors
                                          move like AdamW; r = min(r, trust_clip) when trust_clip is set)
    w -= lr · r · u

Param groups with ``exclude_from_adaptation=True`` (biases, norms) use r = 1: AdamW with the group's
own weight decay (0 from ``bigbatch.optim.factory``). There is no gradient clipping inside the
optimizer; clip the global norm before ``step()`` if wanted.

``norm_fn`` is the same hook as in :mod:`bigbatch.optim.lars`: a callable mapping a list of tensors
to a 1-D tensor of their L2 norms, used for ‖w‖ and ‖u‖, so a sharded strategy can all-reduce
squared norms over the shard group (see that module's docstring for the calling convention). Here it
is called with ``params + updates`` per (group, device, dtype) bucket in the multi-tensor path and with
``[w, u]`` per tensor in the per-parameter path (``foreach=False``). With a ``norm_fn`` of its own the
default path is the multi-tensor one.

Speed (``benchmarks/optimizer_step.py``): the default path on CPU updates one tensor at a time with a
fused C kernel (:mod:`bigbatch.optim.lamb_kernel`: one pass for m, v, u and both norms, one for w),
or, where that cannot run, with torch's fused AdamW kernel writing the Adam direction into a scratch
u that stays in cache. Both keep one scratch buffer the size of the largest tensor between steps (not
in the state dict). The multi-tensor path (accelerators, sharded ``norm_fn``) uses the same fused
AdamW kernel over the whole bucket; groups with r = 1 are plain fused AdamW.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from bigbatch.optim import lamb_kernel
from bigbatch.optim.layerwise import LayerwiseOptimizer, NormFn, local_norms, ratio_or_one  # noqa: F401


class LAMB(LayerwiseOptimizer):
    """LAMB; see the module docstring for the exact update.

    Args:
        params: tensors or param groups; a group may set ``exclude_from_adaptation=True``.
        lr: learning rate (the trainer overwrites ``group['lr']`` every step).
        betas: Adam's (β1, β2).
        eps: added to √v̂.
        weight_decay: decoupled weight decay λ, part of the update u (so it is trust-scaled too).
        bias_correction: Adam's bias correction of m and v.
        trust_clip: upper bound of the trust ratio (None: unbounded).
        foreach: None (default): the fastest path for the device (see the module docstring); True:
            the multi-tensor path; False: a simple per-parameter loop. May also be set per group.
        norm_fn: list of tensors -> 1-D tensor of their L2 norms (default: local norms).
    """

    GROUP_DEFAULTS = {"trust_clip": None, "bias_correction": True}

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 trust_clip: Optional[float] = None, foreach: Optional[bool] = None,
                 norm_fn: Optional[NormFn] = None) -> None:
        if lr < 0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: both must be in [0, 1), got {tuple(betas)}")
        if eps < 0:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        if trust_clip is not None and trust_clip <= 0:
            raise ValueError(f"trust_clip: must be > 0 or None, got {trust_clip}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip, foreach=foreach)
        super().__init__(params, defaults, norm_fn)

    def _init_state(self, group: dict, params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1

    # ------------------------------------------------------------------ shared pieces

    def _corrections(self, group: dict, step: int) -> tuple[float, float]:
        if not group["bias_correction"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        return 1.0 - beta1 ** step, 1.0 - beta2 ** step

    def _ratio(self, group: dict, w_norm: Tensor, u_norm: Tensor) -> Tensor:
        r = ratio_or_one(w_norm, u_norm, w_norm, u_norm)
        if group["trust_clip"] is not None:
            r = torch.clamp(r, max=group["trust_clip"])
        return r

    # ------------------------------------------------------------------ per-parameter path

    def _single_update(self, group: dict, p: Tensor) -> None:
        g = p.grad
        state = self.state[p]
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        bc1, bc2 = self._corrections(group, state["step"])
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(bc2).sqrt_().add_(group["eps"])
        u = m.div(bc1).div_(denom)
        if group["weight_decay"] != 0:
            u.add_(p, alpha=group["weight_decay"])
        if not group["exclude_from_adaptation"]:
            norms = self.norm_fn([p, u])
            u.mul_(self._ratio(group, norms[0:1], norms[1:2])[0].to(u.dtype))
        p.add_(u, alpha=-group["lr"])

    # ------------------------------------------------------------------ shared by the fast paths

    def _fused_args(self, group: dict, params: list[Tensor]):
        """Gradients, moments and step tensors for torch's fused AdamW kernel (one tensor per
        distinct step). Without bias correction the step is +inf: 1 − β^inf = 1 exactly."""
        states = [self.state[p] for p in params]
        steps: dict[int, Tensor] = {}
        for s in states:
            if s["step"] not in steps:
                value = float(s["step"]) if group["bias_correction"] else float("inf")
                steps[s["step"]] = torch.tensor(value, device=params[0].device)
        return ([p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [steps[s["step"]] for s in states])

    def _add_adam_direction(self, group: dict, u: list[Tensor], grads, m, v, steps) -> None:
        """u += m̂/(√v̂+eps), updating m and v, in one pass of torch's fused AdamW kernel: with
        lr = -1 and no weight decay its "parameter" update is exactly that addition."""
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(u, grads, m, v, [], steps, lr=-1.0, beta1=beta1, beta2=beta2,
                            weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False)

    def _adamw_update(self, group: dict, params: list[Tensor]) -> None:
        """Excluded groups (r = 1): LAMB is AdamW with decoupled decay, so the fused kernel does it all."""
        beta1, beta2 = group["betas"]
        grads, m, v, steps = self._fused_args(group, params)
        torch._fused_adamw_(params, grads, m, v, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                            maximize=False)

    def _ratio_float(self, group: dict, w_norm: float, u_norm: float) -> float:
        """`_ratio` for one tensor's norms as Python floats (no tensor ops per tensor)."""
        if not (w_norm > 0 and u_norm > 0):
            return 1.0
        r = w_norm / u_norm
        return min(r, group["trust_clip"]) if group["trust_clip"] is not None else r

    # ------------------------------------------------------------------ tensor-at-a-time path (CPU)

    def _tensorwise_ok(self, params: list[Tensor]) -> bool:
        # Per-tensor norms would change the norm_fn call pattern (one call per bucket), so a
        # sharded norm_fn takes the multi-tensor path.
        return super()._tensorwise_ok(params) and self.norm_fn is local_norms

    def _tensorwise_update(self, group: dict, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        if not all(t.is_contiguous() for t in params + grads):  # the shared scratch u is contiguous
            return self._foreach_update(group, params)
        if group["exclude_from_adaptation"]:
            return self._adamw_update(group, params)
        lib = lamb_kernel.library() if lamb_kernel.supports(params + grads) else None
        if lib is not None:
            states = [self.state[p] for p in params]
            return lamb_kernel.lamb_step(
                lib, params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                self._scratch(params[0], max(p.numel() for p in params)), lr=group["lr"],
                betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                corrections=[self._corrections(group, s["step"]) for s in states],
                trust_clip=group["trust_clip"], adapt=True)
        self._tensorwise_torch(group, params)

    def _tensorwise_torch(self, group: dict, params: list[Tensor]) -> None:
        """One tensor at a time through a shared scratch u, so u and w are still in cache for the norm
        and update passes (the multi-tensor path streams every intermediate through memory)."""
        wd, lr = group["weight_decay"], group["lr"]
        scratch = self._scratch(params[0], max(p.numel() for p in params))
        for p, g, m, v, step in zip(params, *self._fused_args(group, params)):
            u = scratch[:p.numel()].view_as(p)
            if wd != 0:
                torch.mul(p, wd, out=u)
            else:
                u.zero_()
            self._add_adam_direction(group, [u], [g], [m], [v], [step])
            w_norm, u_norm = local_norms([p, u]).tolist()
            p.add_(u, alpha=-lr * self._ratio_float(group, w_norm, u_norm))

    # ------------------------------------------------------------------ multi-tensor path

    def _foreach_update(self, group: dict, params: list[Tensor]) -> None:
        grads, m, v, steps = self._fused_args(group, params)
        if not _same_layout(params, grads):
            return self._loop(group, params)
        if group["exclude_from_adaptation"]:
            return self._adamw_update(group, params)
        wd = group["weight_decay"]
        u = list(torch._foreach_mul(params, wd)) if wd != 0 else [torch.zeros_like(p) for p in params]
        self._add_adam_direction(group, u, grads, m, v, steps)
        n = len(params)
        norms = self.norm_fn(params + u)
        ratios = self._ratio(group, norms[:n], norms[n:]).to(u[0].dtype)
        torch._foreach_mul_(u, list(ratios.unbind(0)))
        torch._foreach_add_(params, u, alpha=-group["lr"])


def _same_layout(params: list[Tensor], grads: list[Tensor]) -> bool:
    """The fused kernels pair elements by memory position: gradients must be laid out like params."""
    return all(p.stride() == g.stride() for p, g in zip(params, grads))
