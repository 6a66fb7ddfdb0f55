"""Issue 19 item 6: with the guard off the loop reads the global loss every log period, not every step.

Reading a device scalar (`.item()`) waits for all queued work; the losses of the steps in between stay
on the device and one collective plus one read resolves them. The rows written must be the same, value
for value, as when every step is read (`loss_every = 1`, the spike guard's mode), skipped non-finite
steps included, and the number of host reads per step must drop.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bigbatch.launch.runtime import Runtime
from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from tests.conftest import tiny_config
from tests.reliability.test_divergence import bad_model

CLOCK_KEYS = ("time", "step_time_s", "samples_per_s", "tokens_per_s", "tokens_per_s_per_rank", "mfu")
STEPS, LOG_EVERY = 23, 10


def train(tmp_path, name: str, loss_every: int | None, **sections):
    raw = tiny_config(tmp_path, run={"name": name, "max_steps": STEPS},
                      metrics={"log_every_steps": LOG_EVERY, "tensorboard": False, "progress": "none"},
                      checkpoint={"every_steps": 7}, eval={"every_steps": 5}, **sections)
    trainer = build_trainer(validate_config(raw), Runtime(0, 1, 0, torch.device("cpu"), None))
    if loss_every is not None:
        trainer.loss_every = loss_every
    trainer.fit()
    trainer.metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, [{k: v for k, v in row.items() if k not in CLOCK_KEYS} for row in rows]


def same(a, b) -> bool:
    """Equal values, NaN equal to NaN (json turns NaN back into float nan)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def assert_same_rows(rows, reference) -> None:
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys()
        assert all(same(row[k], ref[k]) for k in row), (row, ref)


def test_the_guard_off_reads_the_loss_every_log_period(tmp_path):
    deferred, _ = train(tmp_path, "deferred", None)
    assert deferred.loss_every == LOG_EVERY  # build's choice without the guard
    guarded, _ = train(tmp_path, "guarded", None, guard={"enabled": True})
    assert guarded.loss_every == 1  # the spike guard decides on every step's loss


def test_rows_are_identical_to_reading_every_step(tmp_path):
    _, reference = train(tmp_path, "every", 1)
    _, rows = train(tmp_path, "deferred", LOG_EVERY)
    # Same rows in the same order: train rows, evals every 5 steps and the checkpoints' flushes between.
    assert_same_rows(rows, reference)
    assert [r["step"] for r in rows if r.get("kind", "train") == "train"] == list(range(1, STEPS + 1))


def test_non_finite_losses_are_skipped_as_when_read_every_step(tmp_path):
    # A NaN weight from the 4th forward on: every later loss is NaN. Read every step, the loss check
    # skips those steps; deferred, the NaN-poisoned gradients make the strategy decline them, and the
    # skip path reads the loss so the guard records a non-finite *loss* just the same.
    model = bad_model(bad_from=4, mode="corrupt")
    guard = {"max_consecutive_skips": 50}
    every, reference = train(tmp_path, "every", 1, model=model, guard=guard)
    deferred, rows = train(tmp_path, "deferred", LOG_EVERY, model=model, guard=guard)
    assert_same_rows(rows, reference)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped == list(range(4, STEPS + 1))
    assert [e.reason for e in deferred.guard.events] == [e.reason for e in every.guard.events]
    assert "non-finite loss nan" in deferred.guard.events[0].reason


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts Tensor.item and Tensor.tolist calls: each one waits for the device."""
    counts = {"item": 0, "tolist": 0}
    for name in counts:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


@pytest.mark.parametrize("loss_every", [1, LOG_EVERY])
def test_host_reads_per_step(tmp_path, monkeypatch, loss_every):
    # Without checkpoints or evals: reads = one gradient norm per step (the strategy's skip decision),
    # plus the loss each step (loss_every 1) or one read of the pending losses per log period and at
    # the end: 23 steps -> 23 + 23 = 46 reads, or 23 + 3 (steps 10, 20 and the final 21-23) = 26.
    raw = tiny_config(tmp_path, run={"name": f"r{loss_every}", "max_steps": STEPS},
                      metrics={"log_every_steps": LOG_EVERY, "tensorboard": False, "progress": "none"},
                      checkpoint={"at_end": False}, eval={"at_end": False}, remat={"measure_every_steps": None})
    trainer = build_trainer(validate_config(raw), Runtime(0, 1, 0, torch.device("cpu"), None))
    trainer.loss_every = loss_every
    counts = count_host_reads(monkeypatch)
    trainer.fit()
    trainer.metrics.close()
    expected = STEPS + (STEPS if loss_every == 1 else math.ceil(STEPS / LOG_EVERY))
    assert counts["item"] + counts["tolist"] == expected
