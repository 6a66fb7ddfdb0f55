"""Muon: momentum orthogonalized by Newton–Schulz (Jordan et al. 2024), AdamW for everything else.

Hidden weight matrices (``use_muon=True`` groups) take, for gradient g, momentum μ, learning rate lr
and weight decay λ, with the matrix of shape rows × cols (a conv filter is seen as out × in·kh·kw):

    b = μ·b + g                                 (b starts at 0; torch SGD's convention)
    u = g + μ·b   (Nesterov)   or   u = b
    O = NS₅(u)                                  (≈ U·Vᵀ of u = U·S·Vᵀ: every singular value → ~1)
    w = w·(1 − lr·λ) − lr · 0.2·√max(rows, cols) · O

NS₅ is the quintic Newton–Schulz iteration on X₀ = u / (‖u‖_F + 1e-7), run on the transpose when
rows > cols so X·Xᵀ is the small Gram matrix: ``ns_steps`` times X ← a·X + (b·A + c·A²)·X with
A = X·Xᵀ and Keller Jordan's (a, b, c) = (3.4445, −4.7750, 2.0315). These coefficients trade
exactness for speed: after 5 steps the singular values land in roughly [0.7, 1.2], not at 1.

Scale: 0.2·√max(rows, cols) makes the update's RMS about 0.2, AdamW's typical update RMS (Liu et al.
2025, "Muon is Scalable for LLM Training"), so ONE learning rate and weight decay serve both the Muon
matrices and the AdamW parameters, and `optim.lr_scaling` moves both together. (Keller Jordan's
√max(1, rows/cols) needs a separate, ~50× smaller AdamW LR.) Since NS normalizes u, the scale of the
momentum buffer does not matter: the EMA form b = μ·b + (1−μ)·g gives the same update.

Every other parameter (``use_muon=False``: embeddings, the output head, biases, norms; default for
tensors with fewer than 2 dimensions) is stepped by AdamW with the group's betas, eps and weight
decay, at the same lr: m, v Adam moments with bias correction, w = w·(1 − lr·λ) − lr·m̂/(√v̂ + eps).

Sharding: a parameter that is a sharded DTensor (FSDP2, zero2/zero3) is gathered whole
(``full_tensor``, one all-gather per matrix per step) for NS₅, which every rank computes on the same
input, and each rank keeps its own slice of the result; momentum and AdamW state stay sharded. Every
rank must therefore step the same matrices in the same order, as FSDP2 ensures. ZeroRedundancyOptimizer
(zero1) hands each rank whole tensors, so nothing is gathered there. `muon_param_groups` decides which
parameters are hidden matrices.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2  # AdamW's typical update RMS, which Muon's update is scaled to


def newton_schulz(g: Tensor, steps: int = 5) -> Tensor:
    """The quintic Newton–Schulz orthogonalization of the 2-D `g` (module docstring), in float32 at
    least (float64 stays float64), returned in g's dtype."""
    if g.ndim != 2:
        raise ValueError(f"newton_schulz: needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.promote_types(g.dtype, torch.float32))
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return (x.T if tall else x).to(g.dtype)


def matrix_view(t: Tensor) -> Tensor:
    """`t` as rows × cols: a conv filter (out, in, kh, kw) becomes out × (in·kh·kw)."""
    return t.reshape(t.shape[0], -1)


def muon_scale(shape: torch.Size) -> float:
    rows, cols = shape[0], math.prod(shape[1:])
    return RMS_MATCH * math.sqrt(max(rows, cols))


def orthogonalized(update: Tensor, steps: int) -> Tensor:
    """NS₅ of `update` viewed as a matrix, shaped and placed like `update`: a sharded DTensor is
    gathered whole, orthogonalized (identically on every rank) and re-sliced without communication."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(update, DTensor):
        return newton_schulz(matrix_view(update), steps).reshape(update.shape)
    whole = newton_schulz(matrix_view(update.full_tensor()), steps).reshape(update.shape)
    replicated = DTensor.from_local(whole, update.device_mesh, [Replicate()] * update.device_mesh.ndim,
                                    run_check=False)
    return replicated.redistribute(update.device_mesh, update.placements)


class Muon(torch.optim.Optimizer):
    """Muon for ``use_muon`` groups, AdamW for the others; see the module docstring.

    Args:
        params: tensors or param groups; a group may set ``use_muon`` (default: tensors with ≥ 2
            dimensions use Muon; `muon_param_groups` sets it from the model's structure).
        lr: learning rate of both parts (the trainer overwrites ``group['lr']`` every step).
        momentum, nesterov: Muon's momentum μ and whether the update looks ahead (g + μ·b).
        weight_decay: decoupled, both parts: w ← w·(1 − lr·λ).
        betas, eps: the AdamW part's.
        ns_steps: Newton–Schulz iterations.
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 ns_steps: int = 5) -> None:
        if lr < 0:
            raise ValueError(f"lr: must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1), got {momentum}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: both must be in [0, 1), got {tuple(betas)}")
        if weight_decay < 0 or eps < 0:
            raise ValueError(f"weight_decay, eps: must be >= 0, got {weight_decay}, {eps}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps: must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        betas=tuple(betas), eps=eps, ns_steps=ns_steps, use_muon=None)
        super().__init__(params, defaults)

    @staticmethod
    def _is_muon(group: dict, p: Tensor) -> bool:
        return group["use_muon"] if group["use_muon"] is not None else p.ndim >= 2

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                if self._is_muon(group, p):
                    self._muon_update(group, p)
                else:
                    self._adamw_update(group, p)
        return loss

    def _muon_update(self, group: dict, p: Tensor) -> None:
        if p.ndim < 2:
            raise ValueError(f"Muon: a use_muon parameter must have >= 2 dimensions, got shape {tuple(p.shape)}")
        g, mu, lr = p.grad, group["momentum"], group["lr"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.mul_(mu).add_(g)
        update = g.add(buf, alpha=mu) if group["nesterov"] else buf
        o = orthogonalized(update, group["ns_steps"])
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(o, alpha=-lr * muon_scale(p.shape))

    def _adamw_update(self, group: dict, p: Tensor) -> None:
        g, lr = p.grad, group["lr"]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = step = int(state["step"]) + 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(1 - beta2 ** step).sqrt_().add_(group["eps"])
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


# ------------------------------------------------------------------------------ parameter roles

def adamw_matrices(model: nn.Module) -> set[int]:
    """ids of the ≥2-D parameters that are not hidden matrices: every `nn.Embedding` weight (a head
    tied to it is the same Parameter) and the weight of the output layer, taken to be the last
    `nn.Linear` in module registration order (`head` in bigbatch's MLP, ResNet and GPT)."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        ids.add(id(linears[-1].weight))
    return ids


def muon_param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Hidden matrices (Muon), then embeddings and the head (AdamW, decayed), then biases and norms
    (AdamW, no decay unless `decay_norm_and_bias`); empty groups are left out."""
    excluded = adamw_matrices(model)
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if p.ndim >= 2 and id(p) not in excluded]
    outer = [p for p in params if p.ndim >= 2 and id(p) in excluded]
    vectors = [p for p in params if p.ndim < 2]
    groups = [{"params": hidden, "weight_decay": weight_decay, "use_muon": True},
              {"params": outer, "weight_decay": weight_decay, "use_muon": False},
              {"params": vectors, "weight_decay": weight_decay if decay_norm_and_bias else 0.0,
               "use_muon": False}]
    return [g for g in groups if g["params"]]


def hidden_matrix_params(model: nn.Module) -> int:
    """Parameters Muon steps with a momentum buffer only (the planner's 4-byte share)."""
    groups = muon_param_groups(model, 0.0, False)
    return sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
