"""Random inputs with labels from a fixed random linear teacher: learnable, instant, for benchmarks."""

from __future__ import annotations

import torch

from bigbatch.data.base import DataBundle, TensorSplit


def load_synthetic(shape: list[int], num_classes: int, num_samples: int, val_fraction: float,
                   seed: int) -> DataBundle:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, *shape, generator=gen)
    teacher = torch.randn(inputs[0].numel(), num_classes, generator=gen)
    targets = (inputs.flatten(1) @ teacher).argmax(dim=1)
    cut = max(1, int(num_samples * (1 - val_fraction)))
    return DataBundle(TensorSplit(inputs[:cut], targets[:cut]), TensorSplit(inputs[cut:], targets[cut:]),
                      "classify", tuple(shape), num_classes)
