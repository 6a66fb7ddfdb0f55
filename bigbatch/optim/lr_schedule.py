"""Learning-rate schedules as pure functions of the number of samples seen.

``LRSchedule(...).factor(samples)`` returns the multiplier of the peak LR for the optimizer step that
starts after ``samples`` training samples have been consumed (0 for the first step). Schedules are
defined in samples, not steps, so they do not change when the global batch changes (batch ramps).

Conventions (W = warmup_samples, T = total_samples, m = min_lr_ratio, s = min(samples, T)):

- Warmup (every kind except one_cycle, which has its own rise): for s < W the factor is
  (s + 1) / W, linear from 1/W (small but nonzero, so the very first step already moves) up to
  exactly 1 at s = W − 1; from s = W on the kind's own shape applies.
- constant:  1.
- cosine:    m + (1 − m)·½·(1 + cos(π·p)),   p = (s − W)/(T − W)   (1 at the end of warmup, m at T).
- linear:    1 − (1 − m)·p                  (same p).
- wsd:       warmup–stable–decay: 1 until D = max(W, T·(1 − decay_fraction)), then linear from 1 at
             D to m at T (the last decay_fraction of the run, or what is left after warmup).
- one_cycle: Smith & Topin 2017: a rise phase of R = W samples (R = ⌊0.3·T⌋ when W = 0) where the
             factor grows linearly, m + (1 − m)·(s + 1)/R, from just above m to 1 at s = R − 1;
             then cosine from 1 down to m/100 at T. (PyTorch's OneCycleLR defaults correspond to
             m = 1/25 but with a cosine rise.) With m = 0 the run ends at 0.
- cyclic:    Smith 2017 "triangular": linear between m and 1 with half-period C = cycle_samples
             (required), m at the cycle start, 1 after C samples, m again after 2C. Without warmup
             the cycle starts at m (s = 0); after a warmup it starts at its peak, so the factor is
             continuous: phase = s − W + C.
- After T samples every schedule keeps its value at T (m for cosine/linear/wsd, m/100 for one_cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

KINDS = ("constant", "cosine", "linear", "wsd", "one_cycle", "cyclic")


@dataclass(frozen=True)
class LRSchedule:
    kind: str
    total_samples: int
    warmup_samples: int = 0
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2
    cycle_samples: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown LR schedule '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.total_samples <= 0:
            raise ValueError(f"total_samples: must be > 0, got {self.total_samples}")
        if not 0 <= self.warmup_samples <= self.total_samples:
            raise ValueError(f"warmup_samples: must be in [0, total_samples={self.total_samples}], "
                             f"got {self.warmup_samples}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.kind == "cyclic" and self.cycle_samples is None:
            raise ValueError("cycle_samples: required by the cyclic schedule (samples per half cycle)")
        if self.cycle_samples is not None and self.cycle_samples <= 0:
            raise ValueError(f"cycle_samples: must be > 0, got {self.cycle_samples}")

    @property
    def rise_samples(self) -> int:
        """one_cycle: length of the rising phase (warmup_samples, or 30% of the run when that is 0)."""
        return self.warmup_samples if self.warmup_samples > 0 else max(1, int(0.3 * self.total_samples))

    def factor(self, samples: int) -> float:
        """Multiplier of the peak LR for the step that starts after `samples` samples."""
        if samples < 0:
            raise ValueError(f"samples: must be >= 0, got {samples}")
        s = min(samples, self.total_samples)
        total, m = self.total_samples, self.min_lr_ratio
        if self.kind == "one_cycle":
            rise = self.rise_samples
            if s < rise:
                return m + (1.0 - m) * (s + 1) / rise
            return _cosine(m / 100.0, _progress(s, rise, total))
        warmup = self.warmup_samples
        if s < warmup:
            return (s + 1) / warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            return _cosine(m, _progress(s, warmup, total))
        if self.kind == "linear":
            return 1.0 - (1.0 - m) * _progress(s, warmup, total)
        if self.kind == "wsd":
            decay_start = max(float(warmup), total * (1.0 - self.decay_fraction))
            if s < decay_start:
                return 1.0
            return 1.0 - (1.0 - m) * _progress(s, decay_start, total)
        # cyclic
        cycle = self.cycle_samples
        phase = s - warmup + (cycle if warmup > 0 else 0)
        t = phase % (2 * cycle)
        return m + (1.0 - m) * (1.0 - abs(t / cycle - 1.0))


def _progress(s: float, start: float, end: float) -> float:
    """Fraction of [start, end] covered at s, in [0, 1]; 1 for an empty interval."""
    if end <= start:
        return 1.0
    return min(1.0, max(0.0, (s - start) / (end - start)))


def _cosine(low: float, p: float) -> float:
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * p))
