"""`model.name` → an nn.Module sized for the dataset; custom classes by import path."""

from __future__ import annotations

from torch import nn

from bigbatch.config import ModelConfig
from bigbatch.plugins import PluginError, load_plugin
from bigbatch.data.base import DataBundle
from bigbatch.models.gpt import GPT
from bigbatch.models.mlp import MLP
from bigbatch.models.resnet import ResNet


def build_model(cfg: ModelConfig, data: DataBundle) -> nn.Module:
    """Build the model. A custom class is called as `Class(**model.kwargs)`."""
    if cfg.name == "mlp":
        return MLP(data.input_shape, data.num_classes, cfg.hidden, cfg.dropout)
    if cfg.name == "resnet":
        if len(data.input_shape) != 3:
            raise ValueError(f"model.name: resnet needs image inputs (C,H,W), got shape {data.input_shape}")
        return ResNet(data.input_shape, data.num_classes, cfg.width, cfg.blocks)
    if cfg.name == "gpt":
        if data.task != "lm":
            raise ValueError("model.name: gpt needs a language-model dataset (data.name text or tokens)")
        return GPT(data.num_classes, data.input_shape[0], cfg.n_layer, cfg.n_head, cfg.d_model,
                   cfg.dropout)
    return custom_model_class(cfg.name)(**cfg.kwargs)


def custom_model_class(spec: str) -> type[nn.Module]:
    """The class `model.name` names, checked to be an nn.Module subclass before anything calls it."""
    cls = load_plugin("model.name", spec)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise PluginError(f"model.name: '{spec}' is a {type(cls).__name__}, not a torch.nn.Module subclass; "
                          "name the model class itself")
    return cls
