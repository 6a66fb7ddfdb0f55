"""The composition root: turns a validated Config and a Runtime into a ready Trainer."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import numpy as np
import torch

from bigbatch.checkpoint.manager import CheckpointManager
from bigbatch.checkpoint.stateful import Counters, RNGState
from bigbatch.config import Config, GuardConfig
from bigbatch.compression.factory import build_compressor
from bigbatch.data.registry import build_data
from bigbatch.data.sampler import GlobalSampler
from bigbatch.distributed.ddp import DDPStrategy, SingleProcess
from bigbatch.distributed.diloco import DiLoCoStrategy, build_pseudo_grad_compressor
from bigbatch.distributed.zero import build_sharding_strategy
from bigbatch.guard import NullGuard, SpikeGuard
from bigbatch.launch.runtime import Runtime
from bigbatch.metrics import MetricsWriter, Progress
from bigbatch.models.registry import build_model
from bigbatch.optim.adaptive_batch import AdaptiveBatch
from bigbatch.optim.batch_schedule import batch_schedule_from
from bigbatch.optim.lr_scaling import peak_lr
from bigbatch.optim.lr_schedule import LRSchedule
from bigbatch.optim.noise_monitor import NoiseScaleMonitor, adaptive_granularity
from bigbatch.remat import apply_remat
from bigbatch.trainer import Trainer
from bigbatch.validate import validate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_samples(cfg: Config, train_size: int, batch_at: Callable[[int], int]) -> int:
    """Length of the run in samples: the smallest of max_samples, epochs and max_steps."""
    limits = []
    if cfg.run.max_samples is not None:
        limits.append(cfg.run.max_samples)
    if cfg.run.epochs is not None:
        limits.append(math.ceil(cfg.run.epochs * train_size))
    if cfg.run.max_steps is not None:
        samples = 0
        for _ in range(cfg.run.max_steps):
            samples += batch_at(samples)
        limits.append(samples)
    return min(limits)


class LRPolicy:
    """(samples seen, global batch) -> LR: the scaling rule gives the peak, the schedule shapes it."""

    def __init__(self, cfg: Config, total: int):
        sched = cfg.lr
        warmup = sched.warmup_samples if sched.warmup_samples is not None else int(sched.warmup_fraction * total)
        self.scaling, self.base_lr = cfg.optim.lr_scaling, cfg.optim.lr
        self.schedule = LRSchedule(kind=sched.name, total_samples=total, warmup_samples=warmup,
                                   min_lr_ratio=sched.min_lr_ratio, decay_fraction=sched.decay_fraction,
                                   cycle_samples=sched.cycle_samples)

    def peak(self, global_batch: int) -> float:
        return peak_lr(self.base_lr, global_batch, self.scaling.rule, self.scaling.base_batch,
                       self.scaling.knee_batch)

    def __call__(self, samples: int, global_batch: int) -> float:
        return self.peak(global_batch) * self.schedule.factor(samples)


def build_diloco(cfg: Config, model: torch.nn.Module, runtime: Runtime) -> DiLoCoStrategy:
    d, c = cfg.diloco, cfg.diloco.compression
    compressor = build_pseudo_grad_compressor(
        c.method, rank=c.rank, start_step=c.start_step, min_compression_rate=c.min_compression_rate,
        error_feedback=c.error_feedback, warm_start=c.warm_start, orthogonalization=c.orthogonalization,
        seed=c.seed)
    return DiLoCoStrategy(model, runtime.device, replicas=d.replicas, inner_steps=d.inner_steps,
                          outer_optimizer=d.outer_optimizer.model_dump(), compressor=compressor,
                          offload=d.offload, bucket_cap_mb=cfg.distributed.bucket_cap_mb,
                          count_intra_bytes=d.count_intra_bytes, fragments=d.fragments, mixing=d.mixing)


def build_strategy(cfg: Config, model: torch.nn.Module, runtime: Runtime):
    if cfg.distributed.strategy == "diloco":  # also single-process: one replica (Lookahead)
        return build_diloco(cfg, model, runtime)
    if not runtime.distributed:
        return SingleProcess(model)
    comp = cfg.compression
    settings = dict(rank=comp.rank, start_step=comp.start_step, min_compression_rate=comp.min_compression_rate,
                    error_feedback=comp.error_feedback, warm_start=comp.warm_start, seed=comp.seed)
    if comp.method == "torch_powersgd":
        ddp_kwargs = dict(compressor=None, torch_powersgd=settings)
    else:
        ddp_kwargs = dict(compressor=build_compressor(comp.method, orthogonalization=comp.orthogonalization,
                                                      **settings))
    ddp_kwargs["bucket_cap_mb"] = cfg.distributed.bucket_cap_mb
    # The noise scale reads local gradients in the hook, so it needs bigbatch's hook even for none.
    ddp_kwargs["native_allreduce"] = (comp.method == "none" and not comp.time_collectives
                                      and not wants_noise_scale(cfg))
    if cfg.distributed.strategy == "ddp":
        return DDPStrategy(model, runtime.device, **ddp_kwargs)
    deepspeed_kwargs = dict(stage=cfg.deepspeed.stage, grad_clip=cfg.optim.grad_clip,
                            micro_batch=cfg.batch.micro_batch, overrides=cfg.deepspeed.config)
    return build_sharding_strategy(cfg.distributed.strategy, model, runtime.device, ddp_kwargs=ddp_kwargs,
                                   deepspeed_kwargs=deepspeed_kwargs)


def wants_noise_scale(cfg: Config) -> bool:
    """metrics.noise_scale, or batch.adaptive which grows the batch from it."""
    return cfg.metrics.noise_scale or cfg.batch.adaptive.enabled


def build_noise_monitor(cfg: Config, strategy, runtime: Runtime, base_batch_at):
    """The noise-scale hook (None when off); with batch.adaptive it also owns the growing batch."""
    adaptive_cfg = cfg.batch.adaptive
    if not wants_noise_scale(cfg):
        return None
    adaptive = None
    if adaptive_cfg.enabled:
        granularity = adaptive_granularity(runtime.world_size, cfg.batch.micro_batch)
        adaptive = AdaptiveBatch(base_batch_at, adaptive_cfg.factor, adaptive_cfg.min or cfg.batch.global_batch,
                                 adaptive_cfg.max or 64 * cfg.batch.global_batch, adaptive_cfg.every_samples,
                                 granularity)
    return NoiseScaleMonitor(strategy, runtime.world_size, cfg.metrics.noise_scale_ema, adaptive)


def build_guard(cfg: GuardConfig):
    if not cfg.enabled:
        return NullGuard()
    return SpikeGuard(nan=cfg.nan, spike_factor=cfg.spike_factor, window=cfg.window,
                      rollback=cfg.rollback, skip_batches=cfg.skip_batches)


def wire_states(strategy, model, optimizer, noise, **more: Any) -> tuple[dict, dict, list]:
    """What the checkpoint holds once (replicated) and per rank, and the after-step hooks, in order.

    Sharding strategies replace the model and optimizer entries (`checkpoint_states`): zero1's
    optimizer is gathered on rank 0 before a save; zero2/zero3/deepspeed save both through their
    `sharded_checkpoint` instead."""
    replicated = {**strategy.checkpoint_states(optimizer), **more, **({"noise_scale": noise} if noise else {})}
    per_rank = {"rng": RNGState(), **({"compression": strategy.compressor} if strategy.compressor else {})}
    after_step = [strategy.comm_metrics] + ([noise] if noise else [])
    if isinstance(strategy, DiLoCoStrategy):
        # Replicas differ inside a cycle: each rank also keeps its own model and inner optimizer
        # (loaded after the replicated copy, which stays as a fallback when the world size changes).
        replicated["diloco"] = strategy.replicated_state()
        per_rank.update(diloco_rank=strategy.per_rank_state(), replica_model=model, replica_optimizer=optimizer)
        after_step.insert(0, strategy.after_step)  # the outer step's bytes belong to this step's row
    return replicated, per_rank, after_step


def build_trainer(cfg: Config, runtime: Runtime) -> Trainer:
    """Everything a run needs, wired together; `trainer.checkpointer.resume()` restores a checkpoint.

    Raises ConfigError (every problem, the world-size rules included) before anything is built."""
    validate(cfg, runtime.world_size)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.run.seed)  # same init on every rank
    data = build_data(cfg.data, cfg.run.seed)
    model = apply_remat(build_model(cfg.model, data), cfg.remat.policy, cfg.remat.k).to(runtime.device)
    seed_everything(cfg.run.seed + 1000 * runtime.rank)  # per-rank dropout streams
    strategy = build_strategy(cfg, model, runtime)
    optimizer = strategy.build_optimizer(cfg.optim)  # sharding decides what the optimizer steps
    batch_at = batch_schedule_from(cfg.batch).batch_at
    total = total_samples(cfg, len(data.train), batch_at)  # adaptive growth is not foreseen here
    noise = build_noise_monitor(cfg, strategy, runtime, batch_at)
    if noise is not None and noise.adaptive is not None:
        batch_at = noise.adaptive.batch_at
    sampler = GlobalSampler(len(data.train), cfg.run.seed, runtime.rank, runtime.world_size)
    counters, guard = Counters(), build_guard(cfg.guard)
    progress = Progress(cfg.metrics.progress, total, cfg.metrics.log_every_steps, active=runtime.is_main)
    replicated, per_rank, after_step = wire_states(strategy, model, optimizer, noise, counters=counters,
                                                   sampler=sampler, guard=guard)
    checkpointer = CheckpointManager(
        cfg.checkpoint, cfg.run_dir, runtime, replicated=replicated, per_rank=per_rank,
        meta_extra={"strategy": cfg.distributed.strategy, "config_hash": cfg.digest()},
        config_text=cfg.to_yaml(), log=progress.write,
        sharded=strategy.sharded_checkpoint(optimizer))
    return Trainer(
        runtime=runtime, strategy=strategy, optimizer=optimizer, data=data, sampler=sampler,
        batch_at=batch_at, lr_at=LRPolicy(cfg, total), micro_batch=cfg.batch.micro_batch,
        total_samples=total, max_steps=cfg.run.max_steps,
        metrics=MetricsWriter(cfg.run_dir, runtime.is_main, cfg.metrics.tensorboard),
        progress=progress, eval_cfg=cfg.eval, checkpointer=checkpointer, grad_clip=cfg.optim.grad_clip,
        precision=cfg.precision, guard=guard, counters=counters, after_step=after_step,
        activation_every=cfg.remat.measure_every_steps)
