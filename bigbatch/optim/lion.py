"""Lion: evolved sign momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

For every parameter w with gradient g, learning rate lr, betas (β1, β2) and weight decay λ:

    c  = β1·m + (1−β1)·g
    w  = w − lr·λ·w                    (decoupled weight decay, applied first, as in the paper)
    w  = w − lr·sign(c)
    m  = β2·m + (1−β2)·g               (m starts at 0)

Every coordinate moves by exactly lr (plus the decay), so Lion's lr is typically 3–10× smaller than
AdamW's and its weight decay 3–10× larger. ``sign(0) = 0``. Param groups may carry extra keys such
as ``exclude_from_adaptation`` (ignored: Lion has no trust ratio).

Equal bit for bit to lion-pytorch's ``Lion`` with its default ``decoupled_weight_decay=False``
(tests/unit/test_optim_references.py); its ``True`` variant, which divides λ by the initial lr, is
not offered.
"""

from __future__ import annotations

from typing import Iterable

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not (0.0 <= betas[0] <= 1.0 and 0.0 <= betas[1] <= 1.0):
            raise ValueError(f"betas: both must be in [0, 1], got {tuple(betas)}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                c = m.mul(beta1).add_(g, alpha=1 - beta1)
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(c.sign_(), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss
