"""`optim.name` → a torch optimizer over two parameter groups.

Biases and normalisation weights (every tensor with fewer than two dimensions) go into a group with
no weight decay and `exclude_from_adaptation=True`, so LARS/LAMB treat them as plain SGD/Adam, as in
the papers. `optim.decay_norm_and_bias: true` puts everything in one group instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from bigbatch.config import OptimConfig
from bigbatch.optim.registry import optimizer_spec
from bigbatch.registry import import_attribute


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay, "exclude_from_adaptation": False}]
    matrices = [p for p in params if p.ndim >= 2]
    vectors = [p for p in params if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay, "exclude_from_adaptation": False}]
    if vectors:
        groups.append({"params": vectors, "weight_decay": 0.0, "exclude_from_adaptation": True})
    return groups


def optimizer_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The groups `cfg.name` steps: its registration's own grouping (muon) or `param_groups`."""
    spec = optimizer_spec(cfg.name)
    group = param_groups if spec.groups is None else import_attribute(spec.groups)
    return group(model, cfg.weight_decay, cfg.decay_norm_and_bias)


def _eps(cfg: OptimConfig, default: float) -> float:
    return default if cfg.eps is None else cfg.eps


def build_sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=cfg.foreach)


def build_adam(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=_eps(cfg, 1e-8), foreach=cfg.foreach)


def build_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=_eps(cfg, 1e-8), foreach=cfg.foreach)


def build_adagrad(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=cfg.lr, eps=_eps(cfg, 1e-10), foreach=cfg.foreach)


def build_rmsprop(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=_eps(cfg, 1e-8), foreach=cfg.foreach)


def build_lars(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from bigbatch.optim.lars import LARS

    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient, eps=_eps(cfg, 1e-8), nesterov=cfg.nesterov,
                clip=cfg.lars_clip, foreach=cfg.foreach)


def build_lamb(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from bigbatch.optim.lamb import LAMB

    return LAMB(groups, lr=cfg.lr, betas=cfg.betas, eps=_eps(cfg, 1e-6), weight_decay=cfg.weight_decay,
                trust_clip=cfg.trust_clip, foreach=cfg.foreach)


def build_lion(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from bigbatch.optim.lion import Lion

    return Lion(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_soap(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """heavyball's SOAP (Vyas et al. 2024). heavyball compiles its step with torch.compile's
    max-autotune by default, minutes of compiling on a CPU: compile on CUDA only."""
    import warnings

    import heavyball
    import heavyball.utils

    if not torch.cuda.is_available():
        heavyball.utils.compile_mode = None
    # The trainer sets every group's LR each step (schedules, batch ramps); heavyball supports that
    # with multi_tensor (its default) and warns once that it is "experimental".
    warnings.filterwarnings("ignore", message="Learning rate changed between steps")
    return heavyball.SOAP(groups, lr=cfg.lr, betas=cfg.betas, eps=_eps(cfg, 1e-8), weight_decay=cfg.weight_decay)


def build_schedule_free_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from bigbatch.optim.schedule_free import ScheduleFreeAdamW

    return ScheduleFreeAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=_eps(cfg, 1e-8),
                             weight_decay=cfg.weight_decay)


def build_muon(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from bigbatch.optim.muon import Muon

    return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                betas=cfg.betas, eps=_eps(cfg, 1e-8), ns_steps=cfg.muon_ns_steps)


def apex_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The optim keys apex's FusedLAMB / LARC take, with our implementations' defaults."""
    if cfg.name == "lamb":
        return dict(lr=cfg.lr, betas=cfg.betas, eps=_eps(cfg, 1e-6), weight_decay=cfg.weight_decay)
    return dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                trust_coefficient=cfg.trust_coefficient, clip=cfg.lars_clip, eps=_eps(cfg, 1e-8))


def optimizer_builder(cfg: OptimConfig) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """`param_groups -> optimizer` for `cfg` (the registered builder, or apex's fused kernels)."""
    build = optimizer_spec(cfg.name).builder()
    if cfg.impl == "apex":
        from bigbatch.optim.apex_impl import build_apex_optimizer

        return lambda groups: build_apex_optimizer(cfg.name, groups, **apex_settings(cfg))
    return lambda groups: build(groups, cfg)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Build `cfg.name` over the model's parameter groups; the LR is reset by the trainer each step."""
    return optimizer_builder(cfg)(optimizer_param_groups(model, cfg))
