"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled").

Three sequences per parameter: z (the base AdamW-like iterate), x (a weighted average of the z's,
the point to evaluate and to ship) and y (the interpolation where gradients are taken):

    y_t     = (1−β1)·z_t + β1·x_t
    v       = β2·v + (1−β2)·g(y_t)²                      v̂ = v / (1−β2^(k+1))
    ĝ       = g(y_t) / (√v̂ + eps) + λ·y_t                (weight decay evaluated at y)
    z_{t+1} = z_t − γ_k·ĝ
    x_{t+1} = (1−c_{k+1})·x_t + c_{k+1}·z_{t+1}

with γ_k = lr·min(1, (k+1)/warmup_steps) (k = steps taken so far in the group),
weight_k = (k+1)^r · (max_{j≤k} γ_j)^weight_lr_power and c_{k+1} = weight_k / Σ_{j≤k} weight_j.
Only y (held in the parameters in train mode) and z, v are stored; y is updated in place as
y ← lerp(y, z_t, c) + γ·(β1·(1−c) − 1)·ĝ, which equals the formulas above. There is no momentum
buffer: β1 is the interpolation.

The steps are bit for bit those of Meta's ``schedulefree.AdamWScheduleFree`` (1.4.1, foreach or not;
tests/unit/test_optim_references.py), not of its ``AdamWScheduleFreePaper``, which scales γ by
√(1−β2^(k+1)) instead of bias-correcting v. Unlike the package, we start in train mode, leave
``p.grad`` as it was, and restore y exactly after ``eval()`` (below).

Train and eval modes
--------------------
In train mode (the default after construction) the model parameters hold y; ``step()`` raises in
eval mode. ``eval()`` switches the parameters to x = y + (1 − 1/β1)·(z − y), ``train()`` switches
back. Call ``optimizer.eval()`` before evaluating or checkpointing (so the checkpoint holds x, the
weights to use) and ``optimizer.train()`` afterwards. ``group['train_mode']`` records the mode and
is saved in ``state_dict``; after loading a checkpoint that was saved in eval mode, call
``train()`` before training on.

With ``exact_restore=True`` (default) ``eval()`` keeps a copy of y (``state['y']``, one extra
parameter copy while in eval mode, also saved in a checkpoint taken in eval mode) and ``train()``
puts it back bit for bit, so eval/checkpoint/resume never perturbs training. With False, ``train()``
recomputes y = (1−β1)·z + β1·x, which is equal up to floating-point rounding, and no copy is kept.

The trainer may overwrite ``group['lr']`` every step (e.g. a warmup from an external schedule);
the averaging weight then uses the largest LR seen so far, as in the reference implementation.
``group['scheduled_lr']`` is the LR actually used by the last step (for logging).
"""

from __future__ import annotations

from typing import Iterable

import torch


class ScheduleFreeAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, exact_restore: bool = True) -> None:
        if lr < 0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not (0.0 < betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: need 0 < beta1 < 1 and 0 <= beta2 < 1, got {tuple(betas)}")
        if eps < 0:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {warmup_steps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                        k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults)
        self.exact_restore = exact_restore

    @property
    def train_mode(self) -> bool:
        """True when the parameters hold y (training), False when they hold x (evaluation)."""
        return all(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters y -> x (no-op for groups already in eval mode)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state[p]
                if "z" not in state:
                    continue
                if self.exact_restore:
                    state["y"] = p.detach().clone(memory_format=torch.preserve_format)
                p.lerp_(state["z"].to(p.device), 1 - 1 / beta1)
            group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters x -> y (no-op for groups already in train mode)."""
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state[p]
                if "y" in state:
                    p.copy_(state.pop("y"))
                elif "z" in state:
                    p.lerp_(state["z"].to(p.device), 1 - beta1)
            group["train_mode"] = True

    @torch.no_grad()
    def step(self, closure=None):
        if not self.train_mode:
            raise RuntimeError("ScheduleFreeAdamW.step() called in eval mode; call optimizer.train() "
                               "after evaluation/checkpointing and before training")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            k = group["k"]
            beta1, beta2 = group["betas"]
            eps, decay = group["eps"], group["weight_decay"]
            warmup = group["warmup_steps"]
            sched = (k + 1) / warmup if k < warmup else 1.0
            lr = group["lr"] * sched
            group["scheduled_lr"] = lr
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum > 0 else 0.0
            bias_correction2 = 1 - beta2 ** (k + 1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("ScheduleFreeAdamW does not support sparse gradients")
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                z, v = state["z"], state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # ĝ goes into the denominator's buffer: one temporary, and p.grad is left as it was
                # (schedulefree divides p.grad in place; same numbers either way)
                denom = v.div(bias_correction2).sqrt_().add_(eps)
                g_hat = torch.div(grad, denom, out=denom)
                if decay != 0:
                    g_hat.add_(p, alpha=decay)
                p.lerp_(z, ckp1)
                p.add_(g_hat, alpha=lr * (beta1 * (1 - ckp1) - 1))
                z.sub_(g_hat, alpha=lr)
            group["k"] = k + 1
        return loss
