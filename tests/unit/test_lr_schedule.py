"""LR schedules as tables: (samples seen, expected multiplier of the peak LR), each row says why."""

from __future__ import annotations

import math

import pytest

from bigbatch.optim.lr_schedule import KINDS, LRSchedule


def check(schedule: LRSchedule, table) -> None:
    for samples, expected in table:
        got = schedule.factor(samples)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), (schedule.kind, samples)


def cos_between(low: float, p: float) -> float:
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * p))


def test_constant_with_warmup():
    check(LRSchedule("constant", total_samples=1000, warmup_samples=100), [
        (0, 1 / 100),      # first step: (0 + 1)/W, small but nonzero
        (49, 0.5),         # halfway through warmup: 50/100
        (99, 1.0),         # last warmup sample reaches the peak
        (100, 1.0),        # after warmup: constant
        (999, 1.0),        # end of the run
        (5000, 1.0),       # past the end: final value
    ])


def test_constant_without_warmup():
    check(LRSchedule("constant", total_samples=10), [
        (0, 1.0),          # no warmup: peak from the first step
    ])


def test_cosine():
    check(LRSchedule("cosine", total_samples=1100, warmup_samples=100, min_lr_ratio=0.1), [
        (0, 0.01),                         # warmup: 1/100
        (100, 1.0),                        # end of warmup: cosine starts at the peak
        (350, cos_between(0.1, 0.25)),     # a quarter of the decay
        (600, 0.55),                       # halfway: (1 + 0.1)/2
        (1100, 0.1),                       # end: min_lr_ratio
        (99999, 0.1),                      # past the end: stays at the minimum
    ])


def test_cosine_no_warmup_to_zero():
    check(LRSchedule("cosine", total_samples=1000), [
        (0, 1.0),          # starts at the peak
        (500, 0.5),        # halfway
        (1000, 0.0),       # min_lr_ratio 0
    ])


def test_linear():
    check(LRSchedule("linear", total_samples=1100, warmup_samples=100, min_lr_ratio=0.2), [
        (49, 0.5),         # warmup
        (100, 1.0),        # decay starts at the peak
        (600, 0.6),        # halfway: 1 − 0.8·0.5
        (850, 0.4),        # three quarters: 1 − 0.8·0.75
        (1100, 0.2),       # end: min_lr_ratio
        (2000, 0.2),       # past the end
    ])


def test_wsd():
    check(LRSchedule("wsd", total_samples=1000, warmup_samples=100, min_lr_ratio=0.0, decay_fraction=0.2), [
        (9, 0.1),          # warmup: 10/100
        (100, 1.0),        # stable phase begins
        (799, 1.0),        # last stable sample (decay starts at 1000·0.8 = 800)
        (800, 1.0),        # decay starts at the peak
        (900, 0.5),        # halfway through the decay
        (950, 0.25),       # three quarters
        (1000, 0.0),       # end
        (1200, 0.0),       # past the end
    ])


def test_wsd_decay_never_starts_inside_warmup():
    check(LRSchedule("wsd", total_samples=100, warmup_samples=60, min_lr_ratio=0.5, decay_fraction=0.5), [
        (59, 1.0),         # warmup ends at the peak (decay would start at 50 but waits for 60)
        (60, 1.0),         # decay from max(W, T·(1−f)) = 60
        (80, 0.75),        # halfway from 60 to 100: 1 − 0.5·0.5
        (100, 0.5),        # end: min_lr_ratio
    ])


def test_one_cycle_default_rise():
    # W = 0 → rise over 30% of the run (300 samples), from min_lr_ratio up to 1, then cosine to m/100.
    check(LRSchedule("one_cycle", total_samples=1000, min_lr_ratio=0.04), [
        (0, 0.04 + 0.96 / 300),                  # first step: just above min_lr_ratio
        (149, 0.04 + 0.96 * 0.5),                # halfway up
        (299, 1.0),                              # top of the cycle
        (300, 1.0),                              # cosine starts at the peak
        (650, cos_between(0.0004, 0.5)),         # halfway down
        (1000, 0.0004),                          # end: min_lr_ratio/100
        (5000, 0.0004),                          # past the end
    ])


def test_one_cycle_explicit_rise():
    check(LRSchedule("one_cycle", total_samples=200, warmup_samples=100, min_lr_ratio=0.0), [
        (0, 0.01),         # m = 0: rise from 1/100
        (99, 1.0),         # top
        (150, 0.5),        # halfway down a cosine to 0
        (200, 0.0),        # end
    ])


def test_cyclic_without_warmup():
    check(LRSchedule("cyclic", total_samples=1000, min_lr_ratio=0.2, cycle_samples=100), [
        (0, 0.2),          # the cycle starts at the bottom
        (50, 0.6),         # halfway up
        (100, 1.0),        # top after one half cycle
        (150, 0.6),        # halfway down
        (200, 0.2),        # bottom again: a full cycle is 2·cycle_samples
        (225, 0.4),        # second cycle, a quarter of the way up: 0.2 + 0.8·0.25
        (325, 0.8),        # second cycle, a quarter of the way down: 1 − 0.8·0.25
        (1000, 0.2),       # end of the run (10 half cycles: bottom)
        (1050, 0.2),       # past the end: the value at total_samples
    ])


def test_cyclic_after_warmup_starts_at_peak():
    check(LRSchedule("cyclic", total_samples=1000, warmup_samples=50, min_lr_ratio=0.0, cycle_samples=100), [
        (24, 0.5),         # warmup: 25/50
        (49, 1.0),         # warmup ends at the peak
        (50, 1.0),         # cycle continues from its peak (no jump down)
        (100, 0.5),        # halfway down
        (150, 0.0),        # bottom
        (250, 1.0),        # top again
    ])


def test_kinds_and_validation():
    assert KINDS == ("constant", "cosine", "linear", "wsd", "one_cycle", "cyclic")
    bad = [
        (dict(kind="step", total_samples=10), "kind"),
        (dict(kind="cosine", total_samples=0), "total_samples"),
        (dict(kind="cosine", total_samples=10, warmup_samples=11), "warmup_samples"),
        (dict(kind="cosine", total_samples=10, warmup_samples=-1), "warmup_samples"),
        (dict(kind="cosine", total_samples=10, min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(kind="wsd", total_samples=10, decay_fraction=0.0), "decay_fraction"),
        (dict(kind="cyclic", total_samples=10), "cycle_samples"),
        (dict(kind="cyclic", total_samples=10, cycle_samples=0), "cycle_samples"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            LRSchedule(**kwargs)
    with pytest.raises(ValueError, match="samples"):
        LRSchedule("constant", total_samples=10).factor(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_positive_at_first_step_and_bounded(kind):
    s = LRSchedule(kind, total_samples=10_000, warmup_samples=1000, min_lr_ratio=0.1, cycle_samples=500)
    values = [s.factor(n) for n in range(0, 12_000, 7)]
    assert values[0] > 0
    assert all(0 <= v <= 1 + 1e-12 for v in values)
