"""A multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.linear, self.drop = nn.Linear(d_in, d_out), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.linear(x)))


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int],
                 dropout: float = 0.0):
        super().__init__()
        widths = [math.prod(input_shape), *hidden]
        self.blocks = nn.ModuleList(MLPBlock(a, b, dropout) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
