"""Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A), from gradient norms that data-parallel training already has.

A gradient averaged over B examples has E|G_B|² = |G|² + tr(Σ)/B, where G is the true gradient and
Σ the per-example gradient covariance. Two batch sizes B_small < B_big give unbiased estimates

    |G|²   ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each one is noisy (and either can be negative on a given step), so both are smoothed separately by
an exponential moving average with Adam-style bias correction (EMA / (1 − decay^n)) and the ratio is
taken of the smoothed values, as the paper recommends; the ratio of averages is far less biased
than the average of ratios.

In data-parallel training: small = one rank's gradient before the all-reduce (B_small = per-rank
batch), big = the all-reduced gradient (B_big = global batch). Averaging the small squared norm over
all ranks (one extra scalar all-reduce) keeps the estimate unbiased and lowers its variance.
Non-finite inputs (e.g. an overflowed fp16 step) are ignored.
"""

from __future__ import annotations

import math
from typing import Optional


class NoiseScaleEstimator:
    def __init__(self, ema_decay: float = 0.95) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self._grad_sq_ema = 0.0
        self._trace_ema = 0.0
        self._ema_weight = 0.0  # 1 − decay^n: the bias-correction denominator
        self.updates = 0

    def update(self, small_sq_norm: float, small_batch: int, big_sq_norm: float,
               big_batch: int) -> Optional[float]:
        """Add one observation; return the current B_simple estimate (None while |G|² ≤ 0)."""
        if not 0 < small_batch < big_batch:
            raise ValueError(f"small_batch/big_batch: need 0 < small_batch < big_batch, got "
                             f"{small_batch} and {big_batch}")
        small, big = float(small_sq_norm), float(big_sq_norm)
        if not (math.isfinite(small) and math.isfinite(big)):
            return self.noise_scale
        grad_sq = (big_batch * big - small_batch * small) / (big_batch - small_batch)
        trace = (small - big) / (1.0 / small_batch - 1.0 / big_batch)
        d = self.ema_decay
        self._grad_sq_ema = d * self._grad_sq_ema + (1 - d) * grad_sq
        self._trace_ema = d * self._trace_ema + (1 - d) * trace
        self._ema_weight = d * self._ema_weight + (1 - d)
        self.updates += 1
        return self.noise_scale

    @property
    def grad_sq(self) -> Optional[float]:
        """Smoothed, bias-corrected estimate of |G|² (None before the first update)."""
        return self._grad_sq_ema / self._ema_weight if self._ema_weight > 0 else None

    @property
    def trace(self) -> Optional[float]:
        """Smoothed, bias-corrected estimate of tr(Σ) (None before the first update)."""
        return self._trace_ema / self._ema_weight if self._ema_weight > 0 else None

    @property
    def noise_scale(self) -> Optional[float]:
        """B_simple = tr(Σ)/|G|², or None until the smoothed |G|² is positive."""
        grad_sq = self.grad_sq
        if grad_sq is None or grad_sq <= 0:
            return None
        return self.trace / grad_sq

    def state_dict(self) -> dict:
        return {"ema_decay": self.ema_decay, "grad_sq_ema": self._grad_sq_ema,
                "trace_ema": self._trace_ema, "ema_weight": self._ema_weight, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema_decay = float(state["ema_decay"])
        self._grad_sq_ema = float(state["grad_sq_ema"])
        self._trace_ema = float(state["trace_ema"])
        self._ema_weight = float(state["ema_weight"])
        self.updates = int(state["updates"])
