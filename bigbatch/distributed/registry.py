"""Parallelism strategies by name (`distributed.strategy`): how to build each and what it can do.

Torch-free, so config validation reads it without importing torch. A builder is called as
`build(cfg, model, runtime) -> Strategy` (see bigbatch.distributed.strategy). Adding a strategy is one
module implementing `Strategy` with its builder, plus one `register_strategy` line below.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.registry import Registry, import_attribute


@dataclass(frozen=True)
class StrategySpec:
    build: str              # "package.module:function": (Config, nn.Module, Runtime) -> Strategy
    shards: bool = False    # spreads state over ranks: needs 2 or more
    ddp_hook: bool = False  # gradients average in bigbatch's DDP comm hook: compression, noise scale

    def builder(self):
        return import_attribute(self.build)


STRATEGIES: Registry[StrategySpec] = Registry("distributed.strategy", "strategy")
register_strategy = STRATEGIES.register


def strategy_spec(name: str) -> StrategySpec:
    return STRATEGIES.get(name)


_B = "bigbatch.distributed.builders"
register_strategy("ddp", StrategySpec(f"{_B}:build_ddp", ddp_hook=True))
register_strategy("zero1", StrategySpec(f"{_B}:build_zero1", shards=True, ddp_hook=True))
register_strategy("zero2", StrategySpec(f"{_B}:build_fsdp", shards=True))
register_strategy("zero3", StrategySpec(f"{_B}:build_fsdp", shards=True))
register_strategy("deepspeed", StrategySpec(f"{_B}:build_deepspeed", shards=True))
register_strategy("diloco", StrategySpec(f"{_B}:build_diloco"))
