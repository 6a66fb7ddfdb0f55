"""Torch-free rules for the optimizer, LR, batch and weight-averaging (ema) sections, run by
bigbatch.validate."""

from __future__ import annotations

import importlib.util

from bigbatch.config import Config, split_batch
from bigbatch.optim.batch_schedule import batch_schedule_from
from bigbatch.optim.registry import optimizer_spec

APEX_OPTIMIZERS = ("lamb", "lars")  # bigbatch.optim.apex_impl



def optim_problems(cfg: Config) -> list[str]:
    optim = cfg.optim
    try:
        spec = optimizer_spec(optim.name)
    except ValueError as err:
        return [str(err)] + batch_schedule_problems(cfg)
    problems = []
    if optim.lr_scaling.rule == "linear_then_sqrt" and optim.lr_scaling.knee_batch is None:
        problems.append("optim.lr_scaling.knee_batch: required by rule linear_then_sqrt")
    if optim.nesterov and optim.momentum == 0 and spec.uses_momentum:
        problems.append(f"optim.nesterov: Nesterov needs momentum > 0 ({optim.name}); set optim.nesterov: false "
                        "or optim.momentum such as 0.9")
    problems += _apex_problems(optim) + _extra_problems(cfg, spec)
    if cfg.lr.name == "cyclic" and cfg.lr.cycle_samples is None:
        problems.append("lr.cycle_samples: required by the cyclic schedule")
    return problems + batch_schedule_problems(cfg)


def _extra_problems(cfg: Config, spec) -> list[str]:
    """An optimizer from an optional package: installed, and under a strategy it supports."""
    name, problems = cfg.optim.name, []
    if spec.package is not None and importlib.util.find_spec(spec.package) is None:
        problems.append(f"optim.name: {name} comes from the '{spec.package}' package, which is not installed; "
                        f"pip install 'bigbatch[{name}]' (or {spec.package} itself), or pick another optimizer")
    if spec.strategies is not None and cfg.distributed.strategy not in spec.strategies:
        *most, last = spec.strategies
        choices = f"{', '.join(most)} or {last}" if most else last
        why = " (zero1 shards its state by whole tensors)" if "zero1" in spec.strategies else ""
        problems.append(f"optim.name: {name} keeps per-matrix preconditioners that bigbatch does not split "
                        f"across ranks; set distributed.strategy to {choices}, not "
                        f"'{cfg.distributed.strategy}'{why}")
    return problems


def _apex_problems(optim) -> list[str]:
    """apex has fused LAMB and LARC only, and FusedLAMB has no trust-ratio clip."""
    if optim.impl != "apex":
        return []
    if optim.name not in APEX_OPTIMIZERS:
        return [f"optim.impl: apex provides only {' and '.join(APEX_OPTIMIZERS)}, not optim.name "
                f"'{optim.name}'; set `optim.impl: torch`"]
    if optim.name == "lamb" and optim.trust_clip is not None:
        return ["optim.trust_clip: apex's FusedLAMB has no trust-ratio clip; unset it or use `optim.impl: torch`"]
    return []


def batch_schedule_problems(cfg: Config) -> list[str]:
    """The schedule's own checks (BatchSchedule raises naming the field), keyed under batch.schedule."""
    try:
        batch_schedule_from(cfg.batch)
    except ValueError as err:
        return [f"batch.schedule.{err}"]
    return []


def batch_world_problems(cfg: Config, world_size: int) -> list[str]:
    """Every batch the schedule will use must split over the ranks and micro-batches."""
    try:
        batches = batch_schedule_from(cfg.batch).all_batches()
    except ValueError:  # reported by batch_schedule_problems
        return []
    problems = []
    for global_batch in batches:
        try:
            split_batch(global_batch, world_size, cfg.batch.micro_batch)
        except ValueError as err:
            problems.append(str(err))
    return problems + adaptive_problems(cfg, world_size)


def adaptive_granularity(world_size: int, micro_batch: int | None) -> int:
    """Batches the adaptive schedule may pick must split over ranks and micro-batches."""
    return world_size * (micro_batch or 1)


def adaptive_problems(cfg: Config, world_size: int) -> list[str]:
    """batch.adaptive's bounds must be batches the world can run, min <= max."""
    adaptive = cfg.batch.adaptive
    if not adaptive.enabled:
        return []
    step = adaptive_granularity(world_size, cfg.batch.micro_batch)
    low, high = adaptive.min or cfg.batch.global_batch, adaptive.max or 64 * cfg.batch.global_batch
    bounds = (("min", low, "" if adaptive.min else " (default: batch.global_batch)"),
              ("max", high, "" if adaptive.max else " (default: 64 x batch.global_batch)"))
    problems = [f"batch.adaptive.{key}: {value}{origin} is not a multiple of {step} (= {world_size} ranks x "
                f"micro-batch {cfg.batch.micro_batch or 1}); set batch.adaptive.{key} to a multiple of {step}"
                for key, value, origin in bounds if value % step]
    if low > high:
        problems.append(f"batch.adaptive.min: {low} is above batch.adaptive.max {high}")
    return problems


def averaging_problems(cfg: Config) -> list[str]:
    """DeepSpeed's engine owns (and at stage 3 partitions) the weights in its own layout: an average
    beside it, swapped in for evaluation and saved with its checkpoint, is not wired; refuse it. Keys
    that SWA ignores are refused when set, and a start past the end of the run never updates."""
    ema = cfg.ema
    if not ema.enabled:
        return []
    problems = []
    if cfg.distributed.strategy == "deepspeed":
        problems.append("ema.enabled: not supported with distributed.strategy deepspeed (its engine owns the "
                        "weights); use zero2 or zero3 for sharded weights, or ema.enabled: false")
    if ema.kind == "swa":
        problems += [f"ema.{key}: only used by ema.kind ema; SWA weighs every snapshot equally: remove "
                     f"ema.{key}" for key in ("decay", "debias") if key in ema.model_fields_set]
    if cfg.run.max_samples is not None and ema.start_samples > cfg.run.max_samples:
        problems.append(f"ema.start_samples={ema.start_samples} is past run.max_samples={cfg.run.max_samples}: "
                        f"the average would never be updated; use at most {cfg.run.max_samples}")
    return problems
