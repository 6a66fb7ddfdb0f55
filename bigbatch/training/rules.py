"""Torch-free checks of the `ema` section (weight averaging), run by bigbatch.validate before anything
starts."""

from __future__ import annotations

from bigbatch.config import Config


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
