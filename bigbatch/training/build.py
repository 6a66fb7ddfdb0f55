"""The composition root: turns a validated Config and a Runtime into a ready Trainer."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from bigbatch.checkpoint.manager import CheckpointManager
from bigbatch.checkpoint.stateful import Counters, RNGState
from bigbatch.config import Config, ConfigError, GuardConfig
from bigbatch.data.prefetch import step_batches
from bigbatch.data.registry import build_data
from bigbatch.data.rules import BUILTIN_DATA
from bigbatch.data.sampler import GlobalSampler
from bigbatch.distributed.builders import build_strategy
from bigbatch.distributed.ddp import SingleProcess
from bigbatch.distributed.rules import wants_noise_scale
from bigbatch.distributed.strategy import Strategy
from bigbatch.training.guard import NullGuard, SpikeGuard
from bigbatch.launch.runtime import Runtime
from bigbatch.metrics import MetricsWriter, Progress, Throughput, resolve_peak_flops
from bigbatch.models.flops import model_flops_per_token
from bigbatch.models.registry import build_model, loss_function
from bigbatch.models.size import check_model_fits
from bigbatch.optim.adaptive_batch import AdaptiveBatch
from bigbatch.optim.batch_schedule import BatchSchedule, batch_schedule_from
from bigbatch.optim.lr_scaling import peak_lr
from bigbatch.optim.lr_schedule import LRSchedule
from bigbatch.optim.noise_monitor import NoiseScaleMonitor
from bigbatch.optim.rules import adaptive_granularity
from bigbatch.memory.remat import apply_remat
from bigbatch.optim.averaging import build_weight_average
from bigbatch.training.evaluate import task_loss
from bigbatch.training.trainer import Trainer
from bigbatch.validate import validate


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_samples(cfg: Config, train_size: int, schedule: BatchSchedule) -> int:
    """Length of the run in samples: the smallest of max_samples, epochs and max_steps.

    Raises ConfigError when a scheduled batch is larger than the training set: one step would take
    some samples twice, and a batch far larger than the data would exhaust memory gathering them."""
    largest = max(schedule.all_batches())
    if largest > train_size:
        key = "batch.global_batch" if largest == cfg.batch.global_batch else "batch.schedule"
        raise ConfigError([f"{key}: a global batch of {largest} is larger than the training set "
                           f"({train_size} samples of data.name={cfg.data.name}); use at most {train_size}"])
    limits = []
    if cfg.run.max_samples is not None:
        limits.append(cfg.run.max_samples)
    if cfg.run.epochs is not None:
        limits.append(math.ceil(cfg.run.epochs * train_size))
    if cfg.run.max_steps is not None:
        limits.append(samples_after_steps(schedule.change_points(), cfg.run.max_steps))
    return min(limits)


def samples_after_steps(points: list[tuple[int, int]], steps: int) -> int:
    """Samples consumed by `steps` optimizer steps of a batch schedule given by its change points.

    Closed form per segment, so max_steps = 2**53 costs as little as 10. A step runs at the batch of the
    segment it starts in, even when it crosses into the next one (BatchSchedule.batch_at)."""
    samples = 0
    ends = [start for start, _ in points[1:]]
    for (_, batch), end in zip(points, ends):
        if samples < end:  # segments already overshot by a crossing step are skipped
            taken = min(steps, -(-(end - samples) // batch))
            samples, steps = samples + taken * batch, steps - taken
    return samples + steps * points[-1][1]


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


def build_noise_monitor(cfg: Config, strategy, runtime: Runtime, base_batch_at, train_size: int):
    """The noise-scale hook (None when off); with batch.adaptive it also owns the growing batch, which
    by default may grow to 64x the configured batch but never past the training set."""
    adaptive_cfg = cfg.batch.adaptive
    if not wants_noise_scale(cfg):
        return None
    adaptive = None
    if adaptive_cfg.enabled:
        granularity = adaptive_granularity(runtime.world_size, cfg.batch.micro_batch)
        minimum = adaptive_cfg.min or cfg.batch.global_batch
        maximum = adaptive_cfg.max or max(minimum, min(64 * cfg.batch.global_batch,
                                                       train_size // granularity * granularity))
        adaptive = AdaptiveBatch(base_batch_at, adaptive_cfg.factor, minimum, maximum, adaptive_cfg.every_samples,
                                 granularity)
    return NoiseScaleMonitor(strategy, runtime.world_size, cfg.metrics.noise_scale_ema, adaptive)


def build_guard(cfg: GuardConfig):
    if not cfg.enabled:  # non-finite steps are still skipped, and too many in a row stop the run
        return NullGuard(nan=cfg.nan, max_consecutive_skips=cfg.max_consecutive_skips)
    return SpikeGuard(nan=cfg.nan, spike_factor=cfg.spike_factor, window=cfg.window,
                      rollback=cfg.rollback, skip_batches=cfg.skip_batches,
                      max_consecutive_skips=cfg.max_consecutive_skips)


def loss_read_every(cfg: Config, strategy: Strategy) -> int:
    """Steps between reads of the global loss (Trainer.loss_every): every log line's period, or every
    step where a step's decision needs its loss. The spike guard decides on each loss. Without it a
    non-finite loss only has to skip the step, which its NaN-poisoned gradients do through the
    strategy's non-finite-norm check: SingleProcess.optimizer_step and its heirs (ddp, zero1-3, DiLoCo)
    decline such a step; DeepSpeed's engine steps anyway, so it reads the loss every step."""
    if cfg.guard.enabled or type(strategy).optimizer_step is not SingleProcess.optimizer_step:
        return 1
    return cfg.metrics.log_every_steps


def wants_prefetch(cfg: Config) -> bool:
    """data.prefetch, by default on for the built-in datasets: their batch() is a pure read. A custom
    split could draw random numbers (augmentation) from torch's global generator, and from a second
    thread those draws would interleave with the training thread's: resume would no longer be exact."""
    return cfg.data.prefetch if cfg.data.prefetch is not None else cfg.data.name in BUILTIN_DATA


def wire_states(strategy: Strategy, model, optimizer, noise, **more: Any) -> tuple[dict, dict, list]:
    """What the checkpoint holds once (replicated) and per rank, and the after-step metrics hooks
    (the loop runs the strategy's own `after_step`, DiLoCo's outer step, before them).

    The strategy says what its model and optimizer entries are (`checkpoint_states`: zero1's optimizer
    is gathered on rank 0 before a save; zero2/zero3/deepspeed save both through their
    `sharded_checkpoint` instead) and what each rank keeps (`rank_states`)."""
    replicated = {**strategy.checkpoint_states(optimizer), **more, **({"noise_scale": noise} if noise else {})}
    per_rank = {"rng": RNGState(), **strategy.rank_states(model, optimizer)}
    after_step = [strategy.comm_metrics] + ([noise] if noise else [])
    return replicated, per_rank, after_step


def build_throughput(cfg: Config, data, model, runtime: Runtime, log) -> Throughput | None:
    """tokens/s and MFU for sequence models (data.task "lm"); None for classifiers. Says once, through
    `log`, how many FLOPs a token costs and whether MFU can be reported."""
    if data.task != "lm":
        return None
    seq_len = math.prod(data.input_shape)
    flops = model_flops_per_token(model, seq_len)
    name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None
    peak, source = resolve_peak_flops(cfg.metrics.peak_flops, runtime.device.type, name, cfg.precision)
    if flops is None:
        log(f"throughput: {seq_len} tokens a sample; model FLOPs unknown (give the model a "
            "flops_per_token(seq_len) method): no MFU")
    elif peak is None:
        log(f"throughput: {flops:.4g} model FLOPs a token (6N + 12·L·d·T); {source}: no MFU (set "
            "metrics.peak_flops to FLOP/s per device or a GPU name)")
    else:
        log(f"throughput: {flops:.4g} model FLOPs a token (6N + 12·L·d·T); MFU against {source}")
    return Throughput(seq_len, runtime.world_size, flops, peak)


def build_trainer(cfg: Config, runtime: Runtime) -> Trainer:
    """Everything a run needs, wired together; `trainer.checkpointer.resume()` restores a checkpoint.

    Raises ConfigError (every problem, the world-size rules included) before anything is built."""
    validate(cfg, runtime.world_size)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.run.seed)  # same init on every rank
    data = build_data(cfg.data, cfg.run.seed)
    check_model_fits(cfg.model, data, runtime.device)  # a hostile size: one line, not an allocator error
    model = apply_remat(build_model(cfg.model, data), cfg.remat.policy, cfg.remat.k).to(runtime.device)
    if cfg.model.compile:
        # In place (nn.Module.compile), before any wrapper: state-dict keys keep their eager names (no
        # `_orig_mod.` prefix), so checkpoints load into eager and compiled runs alike, and DDP, FSDP2
        # and DiLoCo wrap and step the same parameters. Compilation happens at the first forward.
        model.compile()
    seed_everything(cfg.run.seed + 1000 * runtime.rank)  # per-rank dropout streams
    strategy = build_strategy(cfg, model, runtime)
    optimizer = strategy.build_optimizer(cfg.optim)  # sharding decides what the optimizer steps
    schedule = batch_schedule_from(cfg.batch)
    batch_at = schedule.batch_at
    total = total_samples(cfg, len(data.train), schedule)  # adaptive growth is not foreseen here
    noise = build_noise_monitor(cfg, strategy, runtime, batch_at, len(data.train))
    if noise is not None and noise.adaptive is not None:
        batch_at = noise.adaptive.batch_at
    sampler = GlobalSampler(len(data.train), cfg.run.seed, runtime.rank, runtime.world_size)
    counters, guard = Counters(), build_guard(cfg.guard)
    progress = Progress(cfg.metrics.progress, total, cfg.metrics.log_every_steps, active=runtime.is_main)
    throughput = build_throughput(cfg, data, model, runtime, progress.write)
    averaging, sharded = build_weight_average(cfg.ema, strategy), strategy.sharded_checkpoint(optimizer)
    # The average's entries: replicated.pt, its tensors in step-N/dcp/ under zero2/zero3 (sharded).
    replicated, per_rank, after_step = wire_states(strategy, model, optimizer, noise, counters=counters,
                                                   sampler=sampler, guard=guard,
                                                   **averaging.checkpoint_states(sharded))
    checkpointer = CheckpointManager(
        cfg.checkpoint, cfg.run_dir, runtime, replicated=replicated, per_rank=per_rank,
        meta_extra={"strategy": cfg.distributed.strategy, "config_hash": cfg.digest()},
        config_text=cfg.to_yaml(), log=progress.write, sharded=sharded)
    return Trainer(
        runtime=runtime, strategy=strategy, optimizer=optimizer, data=data, sampler=sampler,
        batch_at=batch_at, lr_at=LRPolicy(cfg, total), micro_batch=cfg.batch.micro_batch,
        total_samples=total, max_steps=cfg.run.max_steps,
        metrics=MetricsWriter(cfg.run_dir, runtime.is_main, cfg.metrics.tensorboard),
        progress=progress, eval_cfg=cfg.eval, checkpointer=checkpointer, grad_clip=cfg.optim.grad_clip,
        precision=cfg.precision, guard=guard, counters=counters, after_step=after_step,
        loss_fn=loss_function(cfg.model.loss) or task_loss, throughput=throughput, averaging=averaging,
        activation_every=cfg.remat.measure_every_steps, loss_every=loss_read_every(cfg, strategy),
        batches=step_batches(data.train, sampler, runtime.device, wants_prefetch(cfg)))
