"""Adaptive batch: grows toward factor × noise scale at check points, rounded, clamped, never shrinks."""

from __future__ import annotations

import pytest

from bigbatch.optim.adaptive_batch import AdaptiveBatch


def schedule(**kw):
    args = dict(base_batch_at=lambda s: 64, factor=2.0, minimum=64, maximum=1024, every_samples=1000,
                granularity=32)
    return AdaptiveBatch(**{**args, **kw})


def test_growth_table():
    sched = schedule()
    rows = [  # (samples after the step, noise scale, batch afterwards)
        (500, 300.0, 64),     # before the first check at 1000: unchanged
        (1000, 300.0, 608),   # 2 × 300 = 600 -> nearest multiple of 32 is 608
        (1500, 900.0, 608),   # next check is at 2000
        (2000, 100.0, 608),   # 2 × 100 = 200 would shrink: never shrinks
        (3100, 2000.0, 1024), # 4000 clamped to max; the check at 3000 was passed
        (4000, None, 1024),   # no estimate yet: unchanged
    ]
    for samples, noise, expected in rows:
        sched.observe(samples, noise)
        assert sched.batch_at(samples) == expected, (samples, noise)


def test_base_schedule_is_a_floor_and_state_round_trips():
    sched = schedule(base_batch_at=lambda s: 64 if s < 5000 else 256)
    assert sched.batch_at(6000) == 256
    sched.observe(1000, 208.0)  # 2 × 208 = 416 = 13 × 32
    copy = schedule()
    copy.load_state_dict(sched.state_dict())
    assert copy.batch_at(0) == 416 and copy.next_check == 2000


def test_min_max_must_be_valid_multiples():
    with pytest.raises(ValueError, match="batch.adaptive"):
        schedule(maximum=1000)
