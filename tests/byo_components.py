"""Bring-your-own components for tests (`model.name: tests.byo_components:X`, `model.loss: ...:fn`)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ShapeAwareMLP(nn.Module):
    """Sized by the data: its constructor names `input_shape` and `num_classes`, so bigbatch passes them."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 16):
        super().__init__()
        self.input_shape, self.num_classes = input_shape, num_classes
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


class TinyLM(nn.Module):
    """A bigram-ish language model asking for `vocab_size` and `seq_len`; reports its own FLOPs a token."""

    def __init__(self, vocab_size: int, seq_len: int, *, width: int = 8):
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.emb = nn.Embedding(vocab_size, width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, idx):
        return self.out(self.emb(idx))

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * self.out.weight.numel()  # the one matmul; the embedding is a lookup


class NeedsDepth(nn.Module):
    """Asks for `num_classes` (given by the data) and `depth` (nobody gives it unless model.kwargs does)."""

    def __init__(self, num_classes: int, depth: int):
        super().__init__()
        self.fc = nn.Linear(1, num_classes)


def half_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom loss with a known relation to the default: half of it."""
    return 0.5 * F.cross_entropy(outputs.float(), targets)


class SmoothedCE(nn.Module):
    """A loss class instantiated without arguments."""

    def forward(self, outputs, targets):
        return F.cross_entropy(outputs.float(), targets, label_smoothing=0.1)


class NeedsWeight(nn.Module):
    def __init__(self, weight: float):
        super().__init__()


def three_arguments(outputs, targets, extra):
    return outputs.sum()


NOT_A_FUNCTION = 3
