"""Global batch size as a pure function of the number of samples seen.

- constant: always ``target``.
- ramp: BLOOM/Megatron-LM "rampup-batch-size start increment ramp_samples": the batch grows from
  ``start`` to ``target`` in n = (target − start)/increment equal increments (n must be a whole
  number), each batch size held for ramp_samples/n samples:
      batch = min(target, start + increment·⌊samples / (ramp_samples/n)⌋)
  computed in integers as ⌊samples·n / ramp_samples⌋, so there is no float rounding at the edges.
  Like Megatron, the batch changes only between steps: a step that starts before an edge runs at
  the old batch even if it crosses the edge.
- stages: ``stages = ((until_samples, batch), ...)`` with increasing until_samples; the batch is that
  of the first stage with samples < until_samples, and ``target`` once every stage is over.

``batch_at(samples)`` is meant to be called with the samples consumed before the step.
``all_batches()`` lists every batch the schedule can produce, so the trainer can check that each
one divides over the ranks and micro-batches before training starts; ``change_points()`` lists
where the batch changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from bigbatch.config import BatchConfig

KINDS = ("constant", "ramp", "stages")
# change_points() lists every ramp increment and the trainer walks that list; Megatron's ramps have
# tens of increments.
MAX_RAMP_INCREMENTS = 10_000


def _as_stage(item: Any) -> tuple[int, int]:
    if hasattr(item, "until_samples") and hasattr(item, "batch"):  # a config Stage object
        return int(item.until_samples), int(item.batch)
    if isinstance(item, dict):
        return int(item["until_samples"]), int(item["batch"])
    until, batch = item
    return int(until), int(batch)


@dataclass(frozen=True)
class BatchSchedule:
    kind: str
    target: int
    start: Optional[int] = None
    increment: Optional[int] = None
    ramp_samples: Optional[int] = None
    stages: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown batch schedule '{self.kind}'; choose one of {', '.join(KINDS)}")
        if self.target <= 0:
            raise ValueError(f"target: must be > 0, got {self.target}")
        object.__setattr__(self, "stages", tuple(_as_stage(s) for s in self.stages))
        if self.kind == "ramp":
            for name in ("start", "increment", "ramp_samples"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"{name}: required by kind ramp")
                if value <= 0:
                    raise ValueError(f"{name}: must be > 0, got {value}")
            span = self.target - self.start
            if span < 0:
                raise ValueError(f"start: {self.start} is larger than the target batch {self.target} (batch.global_batch)")
            if span % self.increment:
                raise ValueError(f"increment: (target {self.target} - start {self.start}) = {span} is not a "
                                 f"multiple of increment {self.increment}")
            if span // self.increment > MAX_RAMP_INCREMENTS:
                raise ValueError(f"increment: {span // self.increment} increments from {self.start} to "
                                 f"{self.target}; at most {MAX_RAMP_INCREMENTS}, use a larger increment")
        if self.kind == "stages":
            if not self.stages:
                raise ValueError("stages: kind stages needs at least one (until_samples, batch)")
            ends = [until for until, _ in self.stages]
            if any(e <= 0 for e in ends) or any(b <= a for a, b in zip(ends, ends[1:])):
                raise ValueError(f"stages: until_samples must be positive and increasing, got {ends}")
            batches = [batch for _, batch in self.stages]
            if any(b <= 0 for b in batches):
                raise ValueError(f"stages: every batch must be > 0, got {batches}")

    @property
    def increments(self) -> int:
        """ramp: number of increments n from start to target (0 for the other kinds)."""
        if self.kind != "ramp":
            return 0
        return (self.target - self.start) // self.increment

    def batch_at(self, samples: int) -> int:
        """Global batch for the step that starts after `samples` samples."""
        if samples < 0:
            raise ValueError(f"samples: must be >= 0, got {samples}")
        if self.kind == "constant":
            return self.target
        if self.kind == "ramp":
            n = self.increments
            if n == 0:
                return self.target
            done = (samples * n) // self.ramp_samples
            return min(self.target, self.start + self.increment * done)
        for until, batch in self.stages:
            if samples < until:
                return batch
        return self.target

    def change_points(self) -> list[tuple[int, int]]:
        """[(samples, batch), ...]: the batch at 0 and each sample count where a new batch starts."""
        if self.kind == "constant":
            return [(0, self.target)]
        if self.kind == "ramp":
            n = self.increments
            points = [(0, self.start)]
            for i in range(1, n + 1):  # first s with ⌊s·n/R⌋ ≥ i is ⌈i·R/n⌉
                points.append((-(-i * self.ramp_samples // n), self.start + i * self.increment))
            return points
        points = [(0, self.stages[0][1])]
        bounds = [until for until, _ in self.stages]
        nexts = [batch for _, batch in self.stages[1:]] + [self.target]
        for until, batch in zip(bounds, nexts):
            if batch != points[-1][1]:
                points.append((until, batch))
        return points

    def all_batches(self) -> list[int]:
        """Every distinct batch the schedule produces, in order of first appearance."""
        return list(dict.fromkeys(batch for _, batch in self.change_points()))

    def changes_between(self, a: int, b: int) -> list[tuple[int, int]]:
        """Change points (samples, new batch) with a < samples ≤ b."""
        return [(s, batch) for s, batch in self.change_points() if a < s <= b]


def batch_schedule_from(batch: "BatchConfig") -> BatchSchedule:
    """The schedule a config's `batch` section describes (`batch.global_batch` is the target)."""
    sched = batch.schedule
    return BatchSchedule(kind=sched.kind, target=batch.global_batch, start=sched.start,
                         increment=sched.increment, ramp_samples=sched.ramp_samples,
                         stages=tuple((s.until_samples, s.batch) for s in sched.stages))
