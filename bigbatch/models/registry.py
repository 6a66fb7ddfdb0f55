"""`model.name` → an nn.Module sized for the dataset; custom classes and losses by import path."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from bigbatch.config import ModelConfig
from bigbatch.plugins import PluginError, load_plugin
from bigbatch.data.base import DataBundle
from bigbatch.models.gpt import GPT
from bigbatch.models.mlp import MLP
from bigbatch.models.resnet import ResNet


def build_model(cfg: ModelConfig, data: DataBundle) -> nn.Module:
    """Build the model. A custom class is called as `Class(**data_arguments, **model.kwargs)`."""
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
    cls = custom_model_class(cfg.name)
    return cls(**call_arguments(cls, cfg.name, data_arguments(cls, data), cfg.kwargs))


def custom_model_class(spec: str) -> type[nn.Module]:
    """The class `model.name` names, checked to be an nn.Module subclass before anything calls it."""
    cls = load_plugin("model.name", spec)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise PluginError(f"model.name: '{spec}' is a {type(cls).__name__}, not a torch.nn.Module subclass; "
                          "name the model class itself")
    return cls


def data_arguments(cls: type, data: DataBundle) -> dict[str, Any]:
    """What the data tells a custom model whose constructor names it: `input_shape` (one sample's shape),
    `num_classes` (classes, or the vocabulary of a language model), and for language models also
    `vocab_size` and `seq_len`. Parameters are matched by name; `**kwargs` receives none of them."""
    offered: dict[str, Any] = {"input_shape": tuple(data.input_shape), "num_classes": data.num_classes}
    if data.task == "lm":
        offered.update(vocab_size=data.num_classes, seq_len=data.input_shape[0])
    named = {name for name, p in inspect.signature(cls).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {name: value for name, value in offered.items() if name in named}


def call_arguments(cls: type, spec: str, offered: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`offered` updated by model.kwargs (an explicit value wins), checked against the constructor so that
    a missing or unknown argument is one line naming model.kwargs rather than a TypeError mid-build."""
    arguments = {**offered, **kwargs}
    try:
        inspect.signature(cls).bind(**arguments)
    except TypeError as err:
        given = ", ".join(sorted(offered)) or "nothing"
        raise PluginError(f"model.name: {spec} cannot be built ({err}); the data gave {given}, set the "
                          "rest in model.kwargs") from None
    return arguments


def loss_function(spec: str) -> Callable | None:
    """The training loss model.loss names: None for the built-in cross-entropy, else `fn(outputs,
    targets) -> mean loss` (a function, or an nn.Module loss class instantiated without arguments)."""
    if spec == "cross_entropy":
        return None
    fn = load_plugin("model.loss", spec)
    if isinstance(fn, type):
        if not issubclass(fn, nn.Module):
            raise PluginError(f"model.loss: '{spec}' is a class but not an nn.Module; name a function "
                              "fn(outputs, targets) or an nn.Module loss class")
        try:
            fn = fn()
        except TypeError as err:
            raise PluginError(f"model.loss: {spec}() needs arguments ({err}); name a function, or a "
                              "loss class whose arguments all have defaults") from None
    if not callable(fn):
        raise PluginError(f"model.loss: '{spec}' is a {type(fn).__name__}, not a function; name "
                          "fn(outputs, targets) -> mean loss")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise PluginError(f"model.loss: {spec} cannot be called as fn(outputs, targets); give it "
                          "exactly those two arguments") from None
    except ValueError:  # no signature to inspect (a C function): trust it
        pass
    return fn
