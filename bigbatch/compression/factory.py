"""Build a compressor from its config name and settings.

`method` is a name registered in `bigbatch.compression.registry` (none | fp16 | bf16 | powersgd |
torch_powersgd | int8 | int4 built in; where each may be used is the registry's and the config rules'
business). All but torch_powersgd give a
`Compressor` to register with `ddp_hook.register_compression_hook` (or to call directly, e.g. on
DiLoCo pseudo-gradients). `torch_powersgd` is torch's own DDP hook, not a `Compressor`: this returns
None for it and the caller registers it with `torch_powersgd.register_torch_powersgd` instead.
Settings are PowerSGD's constructor arguments (rank, start_step, min_compression_rate,
error_feedback, warm_start, orthogonalization, seed) plus the quantizers' `block_size` (int8/int4 also
read `error_feedback`), so a whole compression config section can be passed whatever the method; each
method ignores the others' settings. An unknown setting is an error.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from bigbatch.compression.base import Compressor, LowPrecision, NoCompression
from bigbatch.compression.powersgd import PowerSGD
from bigbatch.compression.quantize import Quantized
from bigbatch.compression.registry import COMPRESSORS

POWERSGD_SETTINGS = tuple(inspect.signature(PowerSGD).parameters)
SETTINGS = POWERSGD_SETTINGS + ("block_size",)


def build_none(**settings: Any) -> Compressor:
    return NoCompression()


def build_fp16(**settings: Any) -> Compressor:
    return LowPrecision(torch.float16)


def build_bf16(**settings: Any) -> Compressor:
    return LowPrecision(torch.bfloat16)


def build_powersgd(**settings: Any) -> Compressor:
    return PowerSGD(**{k: v for k, v in settings.items() if k in POWERSGD_SETTINGS})


def _quantized(bits: int, settings: dict[str, Any]) -> Compressor:
    return Quantized(bits, block_size=settings.get("block_size", 64),
                     error_feedback=settings.get("error_feedback", True))


def build_int8(**settings: Any) -> Compressor:
    return _quantized(8, settings)


def build_int4(**settings: Any) -> Compressor:
    return _quantized(4, settings)


def build_compressor(method: str, **settings: Any) -> Compressor | None:
    """The compressor for `method` (None for torch_powersgd: see the module docstring)."""
    spec = COMPRESSORS.get(method)
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown compression setting(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(SETTINGS)}")
    return None if spec.build is None else spec.builder()(**settings)
