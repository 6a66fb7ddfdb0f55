"""The loss-spike guard: skip non-finite steps, roll back on loss spikes (the PaLM recipe).

PaLM (Chowdhery et al. 2022, §5.1) saw loss spikes at large scale that were not caused by bad data
alone but by a bad data/state combination; restarting from a checkpoint ~100 steps before the spike
and skipping ~200-500 batches made them go away. This guard detects both failure kinds from the
global loss of each step and tells the trainer what to do:

    action = guard.check(mean_loss, step)   # the all-reduced loss: every rank takes the same action
    if action is GuardAction.OK:
        optimizer.step(); guard.record(mean_loss)
    elif action is GuardAction.SKIP_STEP:   # non-finite loss: drop the gradients, keep going
        optimizer.zero_grad(set_to_none=True)
    elif action is GuardAction.ROLLBACK:    # spike: go back, then jump over the data around it
        meta = load_checkpoint(find_latest_valid(root), replicated, per_rank, ...)
        guard.after_rollback(meta["step"])  # after the load, which restored the guard's own state
        while guard.take_skip():
            counters.samples += batch_at(counters.samples)  # consume the batch without training

On SKIP_STEP the batch still counts as consumed; on ROLLBACK the checkpoint's counters take over.
With no valid checkpoint to go back to, treat ROLLBACK as SKIP_STEP. The loss must be checked before
`optimizer.step()` (so a bad step never touches the weights) and must be the same number on every
rank (all-reduce it first), or ranks would diverge in what they do.
The guard is replicated state: put it in the checkpoint's `replicated` dict. Its state is the window
of recent accepted losses and the batches still to skip; `events` (what happened and when) is a log
for the metrics sink, not state, so a rollback never erases the record of itself.

Training is deterministic on resume, so rolling back twice to the same checkpoint and skipping the
same batches would reproduce the same spike forever. Each further rollback to the same checkpoint
therefore skips `skip_batches` more batches than the last one, and after `max_rollbacks` in a row
the guard raises instead of looping.

With `rollback=False` a spike is only logged (a SPIKE event) and `check` returns OK. Spike detection
starts once `min_history` losses were accepted, and only for a positive median (a factor of a
non-positive median means nothing).

Non-finite values are caught by both guards, also with guard.enabled false (`NullGuard`): a
non-finite loss (`check`) or global gradient norm (`check_grad_norm`, after the strategy declined to
step) skips the step. After `max_consecutive_skips` skipped steps in a row `raise_if_diverged`
raises `Diverged`, which the CLI turns into exit code 3 (`bigbatch.exit_codes.DIVERGED`).
"""

from __future__ import annotations

import enum
import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class GuardAction(enum.Enum):
    OK = "ok"
    SKIP_STEP = "skip_step"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class GuardEvent:
    step: int | None
    kind: str      # "nonfinite" | "spike" | "rollback"
    loss: float
    reason: str


class Diverged(RuntimeError):
    """Training cannot go on (non-finite steps in a row, a NaN with guard.nan: error, spikes that
    rollbacks do not cure); every rank raises it at the same step. Exit code 3."""


class NonFiniteLossError(Diverged, FloatingPointError):
    """A non-finite loss or gradient norm with guard.nan = 'error'."""


class NonFiniteSkips:
    """Skips steps whose loss or gradient norm is not finite; too many in a row means divergence."""

    def __init__(self, nan: str = "skip", max_consecutive_skips: int = 20):
        if nan not in ("skip", "error"):
            raise ValueError(f"guard.nan: {nan!r} is not one of skip, error")
        if max_consecutive_skips < 1:
            raise ValueError(f"guard.max_consecutive_skips: {max_consecutive_skips} must be >= 1")
        self.nan, self.max_consecutive_skips = nan, max_consecutive_skips
        self.consecutive_skips = 0
        self.events: list[GuardEvent] = []

    def check(self, loss: float, step: int | None = None) -> GuardAction:
        """OK, or SKIP_STEP for a non-finite (global) loss. Does not record; see `record`."""
        loss = float(loss)
        return GuardAction.OK if math.isfinite(loss) else self._nonfinite("loss", loss, step)

    def check_grad_norm(self, norm: float, step: int | None = None) -> GuardAction:
        """OK, or SKIP_STEP for a non-finite (global) gradient norm. Does not record; see `record`."""
        norm = float(norm)
        return GuardAction.OK if math.isfinite(norm) else self._nonfinite("gradient norm", norm, step)

    def _nonfinite(self, what: str, value: float, step: int | None) -> GuardAction:
        if self.nan == "error":
            raise NonFiniteLossError(f"non-finite {what} {value} at step {step} (guard.nan: error; "
                                     "use guard.nan: skip to drop such steps)")
        self.consecutive_skips += 1
        self._event(step, "nonfinite", value, f"non-finite {what} {value}: step skipped "
                                              f"({self.consecutive_skips} in a row)")
        return GuardAction.SKIP_STEP

    def record(self, loss: float) -> None:
        """An accepted (finite, applied) step ends a run of skipped ones."""
        self.consecutive_skips = 0

    def raise_if_diverged(self, step: int) -> None:
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise Diverged(f"{self.consecutive_skips} steps in a row up to step {step} had a non-finite loss "
                           f"or gradient norm (guard.max_consecutive_skips: {self.max_consecutive_skips}); "
                           "the skipped steps left the weights untouched")

    def _event(self, step: int | None, kind: str, loss: float, reason: str) -> None:
        self.events.append(GuardEvent(step, kind, loss, reason))
        logger.warning("guard: step %s: %s", step, reason)


class SpikeGuard(NonFiniteSkips):
    def __init__(self, nan: str = "skip", spike_factor: float = 3.0, window: int = 50,
                 rollback: bool = True, skip_batches: int = 200, min_history: int = 10,
                 max_rollbacks: int = 5, max_consecutive_skips: int = 20):
        super().__init__(nan, max_consecutive_skips)
        if not spike_factor > 1:
            raise ValueError(f"guard.spike_factor: {spike_factor} must be > 1")
        if window < 1 or skip_batches < 0 or min_history < 1 or max_rollbacks < 1:
            raise ValueError("guard: window, min_history and max_rollbacks must be >= 1, skip_batches >= 0")
        self.spike_factor, self.rollback = spike_factor, rollback
        self.skip_batches, self.max_rollbacks = skip_batches, max_rollbacks
        self.min_history = min(min_history, window)
        self.history: deque[float] = deque(maxlen=window)
        self.skip_remaining = 0
        self._rollback_target: int | None = None  # checkpoint step of the last rollback
        self._rollback_streak = 0

    def check(self, loss: float, step: int | None = None) -> GuardAction:
        """What to do with a step whose (global) loss is `loss`. Does not record it; see `record`."""
        action = super().check(loss, step)
        if action is not GuardAction.OK:
            return action
        loss = float(loss)
        threshold = self.threshold()
        if threshold is None or loss <= threshold:
            return GuardAction.OK
        reason = (f"loss {loss:.4g} > {self.spike_factor:g} x median {threshold / self.spike_factor:.4g} "
                  f"of the last {len(self.history)} accepted losses")
        if not self.rollback:
            self._event(step, "spike", loss, reason + " (guard.rollback off: continuing)")
            return GuardAction.OK
        self._event(step, "rollback", loss, reason + ": rolling back")
        return GuardAction.ROLLBACK

    def threshold(self) -> float | None:
        """Losses above this are spikes; None while too few losses were accepted."""
        if len(self.history) < self.min_history:
            return None
        median = statistics.median(self.history)
        return self.spike_factor * median if median > 0 else None

    def record(self, loss: float) -> None:
        """Remember an accepted (finite, applied) loss."""
        super().record(loss)
        self.history.append(float(loss))

    def after_rollback(self, checkpoint_step: int) -> int:
        """Call once the checkpoint of `checkpoint_step` is loaded; returns the batches to skip."""
        if checkpoint_step == self._rollback_target:
            self._rollback_streak += 1
        else:
            self._rollback_target, self._rollback_streak = checkpoint_step, 1
        if self._rollback_streak > self.max_rollbacks:
            raise Diverged(f"loss spiked again after {self.max_rollbacks} rollbacks to the checkpoint "
                               f"of step {checkpoint_step}; the run is not recovering (raise "
                               "guard.skip_batches, lower the LR, or turn guard.rollback off)")
        self.skip_remaining = self.skip_batches * self._rollback_streak
        return self.skip_remaining

    def take_skip(self) -> bool:
        """True (and one fewer to go) while batches remain to be skipped."""
        if self.skip_remaining <= 0:
            return False
        self.skip_remaining -= 1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "skip_remaining": int(self.skip_remaining),
                "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A state without history comes from a run whose guard was off (NullGuard): a fresh window.
        self.history.clear()
        self.history.extend(float(v) for v in state.get("history", []))  # newest kept if window shrank
        self.skip_remaining = int(state.get("skip_remaining", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


class NullGuard(NonFiniteSkips):
    """guard.enabled: false: no spike detection or rollback, but non-finite steps are still skipped."""

    skip_remaining = 0

    def after_rollback(self, checkpoint_step: int) -> int:
        return 0

    def take_skip(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
