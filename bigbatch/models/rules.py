"""Torch-free checks of the `model` section, run by bigbatch.validate before anything starts."""

from __future__ import annotations

from bigbatch.config import ModelConfig
from bigbatch.plugins import plugin_problems

BUILTIN_MODELS = ("mlp", "resnet", "gpt")
BUILTIN_LOSSES = ("cross_entropy",)


def model_problems(model: ModelConfig) -> list[str]:
    return (plugin_problems("model.name", model.name, BUILTIN_MODELS)
            + plugin_problems("model.loss", model.loss, BUILTIN_LOSSES))
