"""Torch-free checks of the `model` section, run by bigbatch.validate before anything starts."""

from __future__ import annotations

from bigbatch.config import Config, ModelConfig
from bigbatch.plugins import plugin_problems

BUILTIN_MODELS = ("mlp", "resnet", "gpt")
BUILTIN_LOSSES = ("cross_entropy",)


def compile_problems(cfg: Config) -> list[str]:
    """model.compile is supported with every strategy but deepspeed, whose engine wraps and drives the
    module itself; compiling the module under it is untested here (DeepSpeed is an optional extra)."""
    if cfg.model.compile and cfg.distributed.strategy == "deepspeed":
        return ["model.compile: not supported with distributed.strategy deepspeed (its engine wraps and "
                "drives the module); use zero2 or zero3 for a compiled sharded model, or model.compile: false"]
    return []


def model_problems(model: ModelConfig) -> list[str]:
    return (plugin_problems("model.name", model.name, BUILTIN_MODELS)
            + plugin_problems("model.loss", model.loss, BUILTIN_LOSSES))
