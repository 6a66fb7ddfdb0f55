"""What a dataset hands the trainer: two indexable splits and a task description."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class DataError(ValueError):
    """A dataset that cannot be used (corrupt file, ids outside the vocabulary, bad encoding); found
    while the run builds, inside each rank. The message names the file and where, on one line, and the
    CLI turns it into exit code 2 like any bad input."""


class Split(Protocol):
    """An indexable split: `batch(indices)` returns the (inputs, targets) of those samples."""

    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TensorSplit:
    """A split held in memory as two tensors (the small datasets here fit easily)."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]


@dataclass
class DataBundle:
    """Train and validation splits plus what the model needs to know about them.

    task is "classify" (targets are class ids, metric accuracy) or "lm" (targets are next-token ids,
    metrics loss and perplexity). `input_shape` is one sample's shape; `num_classes` is the number of
    classes or the vocabulary size.
    """

    train: Split
    val: Split
    task: str
    input_shape: tuple[int, ...]
    num_classes: int
