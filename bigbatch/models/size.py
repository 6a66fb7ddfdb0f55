"""Refuse a model that cannot fit before building it: a width of 10**9 in a YAML file should be one
line naming the `model` keys, not an allocator traceback or a host driven into swap.

The parameters are counted by building the model on the meta device (shapes, no storage). Training
holds at least every weight and its gradient, in float32 before any sharding (each rank builds the
whole model before a strategy wraps it), so 8 bytes a parameter above the memory of the process's
device (host RAM on CPU) can never run. The bound is deliberately loose: what it refuses is certain
to fail; what it lets through may still run out of memory later (activations, optimizer state).
"""

from __future__ import annotations

import os

import torch

from bigbatch.config import ConfigError, ModelConfig
from bigbatch.data.base import DataBundle
from bigbatch.models.registry import build_model

BYTES_PER_PARAMETER = 8  # a float32 weight and its float32 gradient
SIZE_KEYS = {"mlp": "model.hidden", "resnet": "model.width and model.blocks",
             "gpt": "model.d_model and model.n_layer"}


def parameter_count(cfg: ModelConfig, data: DataBundle) -> int | None:
    """Parameters of the model `cfg` builds, counted without allocating them; None for a custom model
    that cannot be built on the meta device (its real build decides). Configuration errors raised by
    the build (ValueError) propagate as they would from the real one."""
    try:
        with torch.device("meta"):
            model = build_model(cfg, data)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a plugin doing real work in __init__; not ours to judge
        return None
    return sum(p.numel() for p in model.parameters())


def memory_bytes(device: torch.device) -> int:
    """Total memory of `device`: the GPU's, or the host's physical RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_fits(cfg: ModelConfig, data: DataBundle, device: torch.device) -> None:
    """Raise ConfigError when the model's weights and gradients alone exceed the device's memory."""
    count = parameter_count(cfg, data)
    if count is None:
        return
    need, have = BYTES_PER_PARAMETER * count, memory_bytes(device)
    if need > have:
        keys = SIZE_KEYS.get(cfg.name, "model.kwargs")
        where = "this host" if device.type == "cpu" else f"device {device}"
        raise ConfigError([f"{keys}: the model has {count:,} parameters; their float32 weights and gradients "
                           f"alone need {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of "
                           f"{where}; make the model smaller"])
