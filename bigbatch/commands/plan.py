"""`bigbatch plan CONFIG --world-size N`: the memory planner applied to a run's own model and data."""

from __future__ import annotations

import torch

from bigbatch.config import Config
from bigbatch.data.registry import build_data
from bigbatch.models.registry import build_model
from bigbatch.models.size import check_model_fits
from bigbatch.memory.planner import format_plan, parse_bytes, plan, spec_from_model


def plan_run(cfg: Config, world_size: int, device_memory: str) -> str:
    """Build the model on CPU (no process group), measure or derive its sizes, and format the plan."""
    try:
        memory = parse_bytes(device_memory)
    except ValueError as err:
        raise ValueError(f"--device-memory: {err}") from None
    torch.manual_seed(cfg.run.seed)
    data = build_data(cfg.data, cfg.run.seed)
    check_model_fits(cfg.model, data, torch.device("cpu"))  # it is built here, on this host
    model = build_model(cfg.model, data)
    sample, _ = data.train.batch(torch.arange(min(2, len(data.train))))
    strategy = cfg.distributed.strategy if cfg.distributed.strategy in ("ddp", "zero1", "zero2", "zero3") else "ddp"
    micro = cfg.batch.micro_batch or max(1, cfg.batch.global_batch // world_size)
    report = plan(spec_from_model(model, sample), world_size, memory, optimizer=cfg.optim.name,
                  momentum=cfg.optim.momentum, precision=cfg.precision, k=cfg.remat.k,
                  strategy=strategy, policy=cfg.remat.policy, micro_batch=micro, weight_average=cfg.ema.enabled)
    return format_plan(report)
