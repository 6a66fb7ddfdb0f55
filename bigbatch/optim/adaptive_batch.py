"""Noise-scale-driven batch growth: the batch follows factor × B_simple upward, never down.

McCandlish et al. (2018) find the most efficient batch near the gradient noise scale B_simple, which
grows as the loss falls. Every `every_samples` samples this schedule moves the global batch to
factor × B_simple, rounded to the nearest multiple of `granularity` (so it always splits over the
ranks and micro-batches), clamped to [min, max], and never below the batch it already has or below
the configured base schedule. The LR follows through the scaling rule, which is a function of the
batch. The current batch and the next check are state, saved in checkpoints.
"""

from __future__ import annotations

from typing import Callable


class AdaptiveBatch:
    def __init__(self, base_batch_at: Callable[[int], int], factor: float, minimum: int, maximum: int,
                 every_samples: int, granularity: int):
        if minimum % granularity or maximum % granularity or minimum > maximum:
            raise ValueError(f"batch.adaptive: min {minimum} and max {maximum} must be multiples of "
                             f"{granularity} (ranks x micro-batch) with min <= max")
        self.base_batch_at, self.factor = base_batch_at, factor
        self.minimum, self.maximum, self.every, self.granularity = minimum, maximum, every_samples, granularity
        self.current, self.next_check = minimum, every_samples

    def batch_at(self, samples: int) -> int:
        return max(self.base_batch_at(samples), self.current)

    def target(self, noise_scale: float) -> int:
        wanted = round(self.factor * noise_scale / self.granularity) * self.granularity
        return min(self.maximum, max(self.minimum, wanted))

    def observe(self, samples: int, noise_scale: float | None) -> bool:
        """Called after each step; returns True when the batch grew."""
        if samples < self.next_check or noise_scale is None:
            return False
        while self.next_check <= samples:
            self.next_check += self.every
        grown = max(self.current, self.target(noise_scale))
        changed, self.current = grown != self.current, grown
        return changed

    def state_dict(self) -> dict:
        return {"current": self.current, "next_check": self.next_check}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.next_check = int(state["current"]), int(state["next_check"])
