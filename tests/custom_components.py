"""User-style components loaded by import path in end-to-end tests (`model.name: tests.custom_components:X`)."""

from __future__ import annotations

import os
import signal

from torch import nn


class DyingMLP(nn.Module):
    """An MLP with dropout whose rank `die_rank` SIGKILLs itself on its `die_at`-th training forward
    pass (a crashed node); die_at=0 never dies."""

    def __init__(self, d_in: int, classes: int, die_rank: int = 0, die_at: int = 0, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(16, classes))
        self.die_rank, self.die_at, self.calls = die_rank, die_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.die_at and int(os.environ.get("RANK", 0)) == self.die_rank:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x)


class SignallingMLP(nn.Module):
    """An MLP whose rank 1 sends SIGUSR1 to itself during its `signal_at`-th training forward (as
    Slurm signals a job before its time limit); signal_at=0 never signals."""

    def __init__(self, d_in: int, classes: int, signal_at: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, classes))
        self.signal_at, self.calls = signal_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.signal_at and int(os.environ.get("RANK", 0)) == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
        return self.net(x)


class GlitchyMLP(nn.Module):
    """An MLP whose training forward passes number `nan_at` returns NaN logits and number `spike_at`
    returns logits scaled by -1000 (confidently wrong: a loss spike); 0 disables either."""

    def __init__(self, d_in: int, classes: int, nan_at: int = 0, spike_at: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, classes))
        self.nan_at, self.spike_at, self.calls = nan_at, spike_at, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at:
                return out * float("nan")
            if self.calls == self.spike_at:
                return out * -1000.0  # confidently wrong: a huge loss
        return out
