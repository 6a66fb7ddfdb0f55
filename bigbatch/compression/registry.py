"""Gradient compressors by name: how to build each and which comm kinds its traffic is counted under.

Torch-free, so config validation reads it without importing torch. `kinds` is what makes a new
compressor's bytes count: `comm_savings` divides the uncompressed bytes by the bytes of every
registered gradient kind, so a compressor recording under a kind it did not register would look free.
Adding a compressor is one file (a `Compressor` subclass from `bigbatch.compression.base` and a
`build(**settings)` function) plus one `register_compressor` line below.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.registry import Registry, import_attribute


@dataclass(frozen=True)
class CompressorSpec:
    build: str | None              # "package.module:function"(**compression settings) -> Compressor;
                                   # None: it registers a DDP hook of its own (torch_powersgd)
    kinds: tuple[str, ...]         # comm kinds its gradient traffic is recorded under
    pseudo_gradients: bool = True  # usable on DiLoCo pseudo-gradients (diloco.compression.method)
    gradients: bool = True         # usable as DDP gradient compression (compression.method)

    def builder(self):
        return import_attribute(self.build)


COMPRESSORS: Registry[CompressorSpec] = Registry("compression.method", "compression method")
register_compressor = COMPRESSORS.register


def compressor_spec(name: str, key: str = "compression.method", pseudo_gradients: bool = False) -> CompressorSpec:
    """The registration of `name`, among those usable on DiLoCo's pseudo-gradients (`pseudo_gradients`)
    or else on DDP's gradients."""
    names = [n for n, spec in COMPRESSORS.items()
             if (spec.pseudo_gradients if pseudo_gradients else spec.gradients)]
    spec = COMPRESSORS.find(name)
    if spec is not None and not spec.gradients and not pseudo_gradients:
        raise ValueError(f"{key}: '{name}' compresses DiLoCo pseudo-gradients only "
                         f"(diloco.compression.method); choose one of {', '.join(names)}")
    return COMPRESSORS.get(name, key, names)


def gradient_kinds() -> tuple[str, ...]:
    """Every comm kind a registered compressor sends gradients under."""
    return tuple(dict.fromkeys(kind for _, spec in COMPRESSORS.items() for kind in spec.kinds))


_F = "bigbatch.compression.factory"
register_compressor("none", CompressorSpec(f"{_F}:build_none", ("grad_allreduce",)))
register_compressor("fp16", CompressorSpec(f"{_F}:build_fp16", ("grad_allreduce_fp16",)))
register_compressor("bf16", CompressorSpec(f"{_F}:build_bf16", ("grad_allreduce_bf16",)))
register_compressor("powersgd", CompressorSpec(f"{_F}:build_powersgd",
                                               ("powersgd_p", "powersgd_q", "powersgd_uncompressed")))
# int8/int4 codes + float32 scales, all-gathered (bigbatch.compression.quantize); DiLoCo only: their
# blocking all-gather has not been tried inside a DDP hook
register_compressor("int8", CompressorSpec(f"{_F}:build_int8", ("grad_allgather_int8",), gradients=False))
register_compressor("int4", CompressorSpec(f"{_F}:build_int4", ("grad_allgather_int4",), gradients=False))
# torch's powerSGD_hook: its compressed steps as PowerSGD's kinds (+ seconds under torch_powersgd), plain
# all-reduce before start_step
register_compressor("torch_powersgd", CompressorSpec(
    None, ("powersgd_p", "powersgd_q", "powersgd_uncompressed", "torch_powersgd", "grad_allreduce"),
    pseudo_gradients=False))
