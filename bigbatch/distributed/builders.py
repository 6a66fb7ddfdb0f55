"""Config → Strategy: the builders `bigbatch.distributed.registry` names, one per strategy.

Each is called as `build(cfg, model, runtime)`; without a process group every strategy but DiLoCo
(one replica: a Lookahead-style outer optimizer) is a plain `SingleProcess`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bigbatch.compression.factory import build_compressor
from bigbatch.compression.powersgd import float32_bytes
from bigbatch.config import Config
from bigbatch.distributed.ddp import DDPStrategy, SingleProcess
from bigbatch.distributed.diloco import DiLoCoStrategy, build_pseudo_grad_compressor
from bigbatch.distributed.registry import strategy_spec
from bigbatch.distributed.rules import wants_noise_scale
from bigbatch.distributed.strategy import Strategy
from bigbatch.distributed.zero import DeepSpeedStrategy, ShardedStrategy, Zero1Strategy


def build_strategy(cfg: Config, model: nn.Module, runtime: Any) -> Strategy:
    """The strategy `distributed.strategy` names, through its registration."""
    if not runtime.distributed and cfg.distributed.strategy != "diloco":
        return SingleProcess(model)
    return strategy_spec(cfg.distributed.strategy).builder()(cfg, model, runtime)


def ddp_settings(cfg: Config, model: nn.Module, runtime: Any) -> dict[str, Any]:
    """DDPStrategy's keyword arguments: the gradient compressor and how plain averaging runs."""
    comp = cfg.compression
    settings = dict(rank=comp.rank, start_step=comp.start_step, min_compression_rate=comp.min_compression_rate,
                    error_feedback=comp.error_feedback, warm_start=comp.warm_start, seed=comp.seed)
    if comp.method == "torch_powersgd":
        kwargs: dict[str, Any] = dict(compressor=None, torch_powersgd=settings)
    else:
        kwargs = dict(compressor=build_compressor(comp.method, orthogonalization=comp.orthogonalization,
                                                  factor_bits=comp.factor_bits, **settings))
        if comp.target_ratio is not None:
            fit_powersgd_rank(kwargs["compressor"], model, comp.target_ratio, runtime.is_main)
    kwargs["bucket_cap_mb"] = cfg.distributed.bucket_cap_mb
    # The noise scale reads local gradients in the hook, so it needs bigbatch's hook even for none.
    kwargs["native_allreduce"] = (comp.method == "none" and not comp.time_collectives
                                  and not wants_noise_scale(cfg))
    return kwargs


def fit_powersgd_rank(compressor: Any, model: nn.Module, target_ratio: float, announce: bool) -> None:
    """compression.target_ratio: the rank from the shapes of the gradients DDP will average."""
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    rank = compressor.fit_rank(shapes, target_ratio)
    if announce:
        sent, full = compressor.step_bytes(shapes), float32_bytes(shapes)
        print(f"compression: PowerSGD rank {rank} (target_ratio {target_ratio:g}): {sent:,} B a compressed "
              f"step, {full / sent:.1f}x fewer than the all-reduce", flush=True)


def build_ddp(cfg: Config, model: nn.Module, runtime: Any) -> DDPStrategy:
    return DDPStrategy(model, runtime.device, **ddp_settings(cfg, model, runtime))


def build_zero1(cfg: Config, model: nn.Module, runtime: Any) -> Zero1Strategy:
    return Zero1Strategy(model, runtime.device, **ddp_settings(cfg, model, runtime))


def build_fsdp(cfg: Config, model: nn.Module, runtime: Any) -> ShardedStrategy:
    return ShardedStrategy(model, runtime.device, stage=int(cfg.distributed.strategy[-1]))


def build_deepspeed(cfg: Config, model: nn.Module, runtime: Any) -> DeepSpeedStrategy:
    return DeepSpeedStrategy(model, runtime.device, stage=cfg.deepspeed.stage, grad_clip=cfg.optim.grad_clip,
                             micro_batch=cfg.batch.micro_batch, overrides=cfg.deepspeed.config)


def build_diloco(cfg: Config, model: nn.Module, runtime: Any) -> DiLoCoStrategy:
    d, c = cfg.diloco, cfg.diloco.compression
    compressor = build_pseudo_grad_compressor(
        c.method, rank=c.rank, start_step=c.start_step, min_compression_rate=c.min_compression_rate,
        error_feedback=c.error_feedback, warm_start=c.warm_start, orthogonalization=c.orthogonalization,
        seed=c.seed, block_size=c.block_size, factor_bits=c.factor_bits)
    return DiLoCoStrategy(model, runtime.device, replicas=d.replicas, inner_steps=d.inner_steps,
                          outer_optimizer=d.outer_optimizer.model_dump(), compressor=compressor,
                          offload=d.offload, bucket_cap_mb=cfg.distributed.bucket_cap_mb,
                          count_intra_bytes=d.count_intra_bytes, fragments=d.fragments, mixing=d.mixing,
                          sync_delay=d.sync_delay, warmup_steps=d.warmup_steps)
