"""One validation pass: a config and a world size in, every problem out, before anything starts.

The schema (`bigbatch.config`) imports nothing of ours; each package states its own torch-free rules
(`bigbatch/*/rules.py`, `bigbatch.slurm.render.sbatch_option_problems`) and this module composes
them. `train`, `launch` (before spawning ranks), `submit` (for the job's world size), `plan` and
`lr-find` all call `load_config`, so a problem is reported once, with exit code 2, before anything
is imported from user code, spawned or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bigbatch.checkpoint.rundir import run_name_problems
from bigbatch.config import Config, ConfigError, parse_config, read_raw_config
from bigbatch.data.rules import data_problems
from bigbatch.distributed.rules import parallel_problems, parallel_world_problems
from bigbatch.metrics import peak_flops_problems
from bigbatch.models.rules import compile_problems, model_problems
from bigbatch.optim.rules import averaging_problems, batch_world_problems, optim_problems
from bigbatch.slurm.render import sbatch_option_problems


def config_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """Every rule; those that depend on the number of ranks only when `world_size` is given."""
    problems = _run_problems(cfg) + data_problems(cfg.data) + model_problems(cfg.model)
    problems += run_name_problems(cfg.run) + compile_problems(cfg)
    problems += peak_flops_problems(cfg.metrics.peak_flops)
    problems += averaging_problems(cfg)
    problems += optim_problems(cfg) + parallel_problems(cfg) + sbatch_option_problems(cfg.slurm)
    if world_size is not None:
        problems += world_problems(cfg, world_size)
    return problems


def world_problems(cfg: Config, world_size: int) -> list[str]:
    """The rules that need the world size: batch splits, sharding, DiLoCo replicas."""
    return batch_world_problems(cfg, world_size) + parallel_world_problems(cfg, world_size)


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """`cfg` unchanged, or ConfigError listing every problem."""
    problems = config_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate_config(raw: dict, world_size: int | None = None, problems: Sequence[str] = ()) -> Config:
    """A raw mapping (parsed YAML) → a validated Config; every schema and rule problem raised at once."""
    cfg, problems = parse_config(raw, problems)
    if cfg is not None:
        problems += config_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = (), world_size: int | None = None) -> Config:
    """Read YAML, apply `a.b=c` overrides, validate; raise ConfigError listing every problem."""
    raw, problems = read_raw_config(path, overrides)
    return validate_config(raw, world_size, problems)


def _run_problems(cfg: Config) -> list[str]:
    if cfg.run.max_steps is None and cfg.run.max_samples is None and cfg.run.epochs is None:
        return ["run: set one of run.max_steps, run.max_samples or run.epochs"]
    return []
