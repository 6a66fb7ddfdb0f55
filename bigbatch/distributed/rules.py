"""Torch-free rules for the parallelism sections (distributed, compression, diloco, deepspeed).

`bigbatch.validate` runs them before anything is spawned or written; the strategies keep only the
checks of values that never pass through a config (direct constructor calls in tests and scripts).
"""

from __future__ import annotations

import importlib.util

from bigbatch.compression.registry import compressor_spec
from bigbatch.config import Config
from bigbatch.distributed.registry import STRATEGIES, strategy_spec
from bigbatch.optim.registry import OPTIMIZERS

DEEPSPEED_STAGES = (0, 1, 2, 3)


def zero_problems(strategy: str, optimizer_name: str, impl: str = "torch", compression: str = "none",
                  noise_scale: bool = False) -> list[str]:
    """Why `strategy` (zero1|zero2|zero3) cannot run this configuration; empty when it can."""
    if strategy not in ("zero1", "zero2", "zero3"):
        return []
    problems = []
    if strategy in ("zero2", "zero3"):
        if impl == "apex":
            problems.append(f"optim.impl: apex's fused kernels cannot step {strategy}'s DTensor shards; "
                            "set `optim.impl: torch`")
        if compression != "none":
            problems.append(f"compression.method: '{compression}' hooks into DDP, which {strategy} does not "
                            "use (FSDP reduce-scatters gradients itself); set `compression.method: none` "
                            "or use distributed.strategy zero1")
        if noise_scale:
            problems.append(f"metrics.noise_scale / batch.adaptive: the noise scale needs per-rank gradients "
                            f"before averaging, which only the DDP hook sees; use ddp or zero1, not {strategy}")
    spec = OPTIMIZERS.find(optimizer_name)
    if strategy == "zero1" and spec is not None and spec.swaps_eval_weights:
        problems.append(f"optim.name: {optimizer_name} swaps its weights for evaluation, which "
                        "ZeroRedundancyOptimizer (each rank owns some tensors) does not forward; use "
                        "distributed.strategy ddp, zero2 or zero3")
    return problems


# ------------------------------------------------------------------------------------- strategies


def deepspeed_problems(strategy: str, stage: int, optimizer_name: str) -> list[str]:
    """Why this DeepSpeed configuration cannot run; empty when it can (or the strategy is another)."""
    if strategy != "deepspeed":
        return []
    if stage not in DEEPSPEED_STAGES:
        return [f"deepspeed.stage: must be 0, 1, 2 or 3, got {stage}"]
    problems = []
    spec = OPTIMIZERS.find(optimizer_name)  # an unknown name is reported by the optim rules
    if stage >= 1 and spec is not None and spec.trust_ratio:
        problems.append(
            f"optim.name: {optimizer_name} needs the norm of each whole parameter tensor for its trust "
            f"ratio, but DeepSpeed ZeRO stage {stage} hands the optimizer flat partitions that cut across "
            "tensors (DeepSpeed issue #490), so the ratios would be wrong; use distributed.strategy zero2 "
            "or zero3 (FSDP, exact whole-tensor norms), deepspeed.stage 0, or an Adam-family optimizer")
    if spec is not None and spec.whole_matrices:
        # ZeRO >= 1 hands the optimizer flat partitions cutting across matrices; stage 0 is untested.
        problems.append(f"optim.name: {optimizer_name} orthogonalizes each whole weight matrix, which bigbatch "
                        "supports under ddp, zero1, zero2 and zero3 but not under DeepSpeed (ZeRO's flat "
                        "partitions cut across matrices); set distributed.strategy to ddp, zero1, zero2 or zero3")
    if stage >= 1 and spec is not None and spec.swaps_eval_weights:
        problems.append(f"optim.name: {optimizer_name} swaps the weights it evaluates at, but under "
                        f"DeepSpeed ZeRO stage {stage} it holds flat fp32 partitions, not the model's "
                        "parameters; use distributed.strategy zero2 or zero3, or deepspeed.stage 0")
    return problems


def wants_noise_scale(cfg: Config) -> bool:
    """metrics.noise_scale, or batch.adaptive which grows the batch from it."""
    return cfg.metrics.noise_scale or cfg.batch.adaptive.enabled


def parallel_problems(cfg: Config) -> list[str]:
    """Every rule of the parallelism sections that holds for any world size."""
    names = _name_problems(cfg)
    if names:  # the other rules read the registrations of these names
        return names
    return _compression_problems(cfg) + _diloco_problems(cfg) + _sharding_problems(cfg)


def parallel_world_problems(cfg: Config, world_size: int) -> list[str]:
    """Rules that need the world size: sharding and the noise scale need ranks, replicas must divide."""
    strategy, problems = cfg.distributed.strategy, []
    if world_size == 1 and strategy in STRATEGIES and STRATEGIES.find(strategy).shards:
        problems.append(f"distributed.strategy: {strategy} shards state over ranks, and this is one process; "
                        "launch 2 or more ranks (bigbatch launch --nproc-per-node 2) or use ddp (a "
                        "zero2/zero3 checkpoint reshards to any number of ranks >= 2)")
    if world_size == 1 and wants_noise_scale(cfg):
        problems.append("metrics.noise_scale / batch.adaptive: the noise scale compares per-rank and averaged "
                        "gradients, so it needs at least 2 ranks (bigbatch launch --nproc-per-node 2)")
    if strategy == "diloco":
        problems += diloco_replica_problems(world_size, cfg.diloco.replicas)
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("distributed.strategy: deepspeed is not installed; pip install 'bigbatch[deepspeed]' "
                        "or use zero1/zero2/zero3")
    return problems


def diloco_replica_problems(world_size: int, replicas: int) -> list[str]:
    if world_size % replicas:
        return [f"diloco.replicas={replicas} does not divide the world size {world_size}; set "
                f"diloco.replicas to a divisor of {world_size} (each replica gets world_size / replicas ranks)"]
    return []


def diloco_cycle_problems(inner_steps: int, fragments: int, sync_delay: int = 0) -> list[str]:
    if fragments > inner_steps:
        return [f"diloco.fragments: {fragments} fragments need at least as many inner steps "
                f"(diloco.inner_steps={inner_steps}); lower diloco.fragments"]
    # Fragments sync at least H // P steps apart: a smaller delay starts each exchange after the
    # previous fragment was applied (one in flight at a time, never before the first step).
    gap = inner_steps // fragments
    if sync_delay >= gap:
        return [f"diloco.sync_delay: {sync_delay} must be below diloco.inner_steps // diloco.fragments = "
                f"{inner_steps} // {fragments} = {gap}, the steps between two fragments' syncs; set "
                f"diloco.sync_delay to at most {gap - 1}"]
    return []


def diloco_warmup_problems(warmup_steps: int, inner_steps: int) -> list[str]:
    # A warm-up of whole cycles keeps every synchronisation on the steps it has without one (the
    # cycles count from its end): evaluations every H steps still follow an outer step.
    if warmup_steps % inner_steps:
        lower = warmup_steps - warmup_steps % inner_steps
        return [f"diloco.warmup_steps: {warmup_steps} must be a multiple of diloco.inner_steps ({inner_steps}), "
                f"so synchronisations stay on multiples of H; set diloco.warmup_steps to {lower} or "
                f"{lower + inner_steps}"]
    return []


def outer_optimizer_problems(momentum: float, nesterov: bool) -> list[str]:
    if nesterov and momentum == 0:
        return ["diloco.outer_optimizer.nesterov: Nesterov needs momentum > 0; set nesterov: false or a "
                "momentum such as 0.9"]
    return []


def _sharding_problems(cfg: Config) -> list[str]:
    strategy, optim = cfg.distributed.strategy, cfg.optim
    noise = wants_noise_scale(cfg)
    # compression problems of zero2/zero3 are reported by _compression_problems
    problems = (zero_problems(strategy, optim.name, optim.impl, "none", noise)
                + deepspeed_problems(strategy, cfg.deepspeed.stage, optim.name))
    if strategy == "deepspeed" and noise:
        problems.append("metrics.noise_scale / batch.adaptive: the noise scale needs per-rank gradients "
                        "before averaging, which only the DDP hook sees; use ddp or zero1, not deepspeed")
    return problems


def _diloco_problems(cfg: Config) -> list[str]:
    if cfg.distributed.strategy != "diloco":
        return []
    d, problems = cfg.diloco, []
    if wants_noise_scale(cfg):
        problems.append("metrics.noise_scale / batch.adaptive: not with distributed.strategy=diloco, whose "
                        "gradients are averaged only inside a replica; turn them off")
    problems += diloco_cycle_problems(d.inner_steps, d.fragments, d.sync_delay)
    problems += diloco_warmup_problems(d.warmup_steps, d.inner_steps)
    problems += outer_optimizer_problems(d.outer_optimizer.momentum, d.outer_optimizer.nesterov)
    if d.compression.factor_bits and d.compression.method != "powersgd":
        problems.append(f"diloco.compression.factor_bits: quantized P and Q are for method powersgd (method is "
                        f"{d.compression.method!r}); for quantized pseudo-gradients set method: int8 or int4")
    return problems


def _name_problems(cfg: Config) -> list[str]:
    """Strategy and compressor names must be registered (pseudo-gradients take only those that can)."""
    problems = []
    try:
        strategy_spec(cfg.distributed.strategy)
    except ValueError as err:
        problems.append(str(err))
    for method, key, pseudo in ((cfg.compression.method, "compression.method", False),
                                (cfg.diloco.compression.method, "diloco.compression.method", True)):
        try:
            compressor_spec(method, key, pseudo_gradients=pseudo)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _compression_problems(cfg: Config) -> list[str]:
    comp = cfg.compression
    if comp.method == "none":
        return []
    if not strategy_spec(cfg.distributed.strategy).ddp_hook:
        hooked = ", ".join(name for name, spec in STRATEGIES.items() if spec.ddp_hook)
        return [f"compression.method: gradient compression hooks into DDP ({hooked}); with "
                f"distributed.strategy={cfg.distributed.strategy} set compression.method: none (FSDP and "
                "DeepSpeed reduce gradients themselves; DiLoCo compresses its pseudo-gradients with "
                "diloco.compression)"]
    if comp.method == "torch_powersgd" and comp.start_step <= 1 and (comp.error_feedback or comp.warm_start):
        return ["compression.start_step: torch's PowerSGD hook needs start_step >= 2 when error_feedback "
                "or warm_start is on"]
    if comp.target_ratio is not None and comp.method != "powersgd":
        return [f"compression.target_ratio: choosing the rank by bytes is bigbatch's PowerSGD only; set "
                f"compression.method: powersgd or remove target_ratio (method is {comp.method!r})"]
    if comp.target_ratio is not None and "rank" in comp.model_fields_set:
        return ["compression.target_ratio: it chooses the rank, so compression.rank cannot be set too; "
                "remove one of them"]
    if comp.factor_bits and comp.method != "powersgd":
        return [f"compression.factor_bits: quantized P and Q are bigbatch's PowerSGD only; set "
                f"compression.method: powersgd or factor_bits: 0 (method is {comp.method!r})"]
    return []
