"""The gradient noise scale during data-parallel training, and the adaptive batch it drives.

Each step the comm hook has seen this rank's gradient before averaging (B_small = per-rank batch)
and the trainer's gradient norm is that of the averaged one (B_big = global batch). One scalar
all-reduce averages the small squared norms over the ranks; the estimator smooths both estimates.
"""

from __future__ import annotations

import math

import torch

from bigbatch.optim.noise_scale import NoiseScaleEstimator


class NoiseScaleMonitor:
    """An after-step hook: logs `noise_scale` and, when adaptive batching is on, grows the batch."""

    def __init__(self, strategy, world_size: int, ema_decay: float, adaptive=None):
        self.strategy, self.world_size, self.adaptive = strategy, world_size, adaptive
        self.estimator = NoiseScaleEstimator(ema_decay)
        strategy.local_grad_norm.enabled = True  # the comm hook starts summing local squared norms

    def __call__(self, trainer) -> dict:
        # on the run's device: NCCL reduces only CUDA tensors
        small_sq = torch.tensor([self.strategy.local_grad_norm.take()], dtype=torch.float64,
                                device=trainer.runtime.device)
        small_sq = self.strategy.all_reduce_mean(small_sq).item()
        big_sq = trainer.last_grad_norm ** 2
        batch = trainer.current_batch
        per_rank = batch // self.world_size
        if not math.isfinite(big_sq) or per_rank >= batch:
            return {}
        noise = self.estimator.update(small_sq, per_rank, big_sq, batch)
        row = {} if noise is None else {"noise_scale": noise}
        if self.adaptive is not None and self.adaptive.observe(trainer.counters.samples, noise):
            row["adaptive_batch"] = self.adaptive.current
        return row

    def state_dict(self) -> dict:
        state = {"estimator": self.estimator.state_dict()}
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state["estimator"])
        if self.adaptive is not None and "adaptive" in state:
            self.adaptive.load_state_dict(state["adaptive"])
