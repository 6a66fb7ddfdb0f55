"""Batch schedules as tables: (samples seen, expected global batch), each row says why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bigbatch.optim.batch_schedule import KINDS, BatchSchedule


def check(schedule: BatchSchedule, table) -> None:
    for samples, expected in table:
        assert schedule.batch_at(samples) == expected, (schedule.kind, samples)


def test_constant():
    s = BatchSchedule("constant", target=512)
    check(s, [
        (0, 512),          # always the target
        (10**9, 512),      # even far into the run
    ])
    assert s.all_batches() == [512]


def test_ramp_megatron_style():
    # 32 → 128 in steps of 32: n = 3 increments, each batch held for 3000/3 = 1000 samples.
    s = BatchSchedule("ramp", target=128, start=32, increment=32, ramp_samples=3000)
    check(s, [
        (0, 32),           # starts at `start`
        (999, 32),         # last sample of the first interval
        (1000, 64),        # one increment after 1000 samples
        (1999, 64),        # still the second size
        (2000, 96),        # two increments
        (2999, 96),        # last sample of the ramp
        (3000, 128),       # ramp done: target
        (10**8, 128),      # stays at the target
    ])
    assert s.increments == 3
    assert s.all_batches() == [32, 64, 96, 128]
    assert s.change_points() == [(0, 32), (1000, 64), (2000, 96), (3000, 128)]
    assert s.changes_between(500, 2000) == [(1000, 64), (2000, 96)]


def test_ramp_with_uneven_interval_uses_exact_integer_edges():
    # n = 3 increments over 1000 samples: edges at 333.33 → first sample counts 334 and 667.
    s = BatchSchedule("ramp", target=16, start=4, increment=4, ramp_samples=1000)
    check(s, [
        (333, 4),          # 333·3/1000 = 0.999 → no increment yet
        (334, 8),          # 334·3/1000 = 1.002 → one increment
        (666, 8),          # 1.998
        (667, 12),         # 2.001
        (999, 12),         # 2.997
        (1000, 16),        # 3: target
    ])
    assert [p for p, _ in s.change_points()] == [0, 334, 667, 1000]


def test_ramp_bloom_numbers():
    # BLOOM-176B: --rampup-batch-size 192 16 9_765_625 to a global batch of 2048.
    s = BatchSchedule("ramp", target=2048, start=192, increment=16, ramp_samples=9_765_625)
    n = (2048 - 192) // 16  # 116 increments
    interval = 9_765_625 / n
    check(s, [
        (0, 192),                          # start
        (int(interval) - 1, 192),          # just before the first edge
        (int(interval) + 1, 208),          # just after: +16
        (int(58 * interval) + 1, 192 + 58 * 16),  # halfway: 58 increments
        (9_765_625, 2048),                 # end of the ramp
    ])
    assert len(s.all_batches()) == n + 1


def test_stages():
    s = BatchSchedule("stages", target=1024, stages=((1000, 256), (3000, 512)))
    check(s, [
        (0, 256),          # first stage
        (999, 256),        # last sample of the first stage (samples < until)
        (1000, 512),       # second stage starts at the first until_samples
        (2999, 512),       # last sample of the second stage
        (3000, 1024),      # every stage is over: target
        (10**7, 1024),     # and stays
    ])
    assert s.all_batches() == [256, 512, 1024]
    assert s.change_points() == [(0, 256), (1000, 512), (3000, 1024)]


def test_stages_accept_lists_dicts_and_config_objects():
    stage = SimpleNamespace(until_samples=100, batch=8)
    a = BatchSchedule("stages", target=32, stages=[stage, {"until_samples": 200, "batch": 16}])
    b = BatchSchedule("stages", target=32, stages=[[100, 8], (200, 16)])
    assert a.stages == b.stages == ((100, 8), (200, 16))
    assert hash(a) == hash(b)  # frozen and hashable after normalisation


def test_stages_repeating_a_batch_lists_it_once():
    s = BatchSchedule("stages", target=64, stages=((10, 64), (20, 32)))
    assert s.all_batches() == [64, 32]
    assert s.change_points() == [(0, 64), (10, 32), (20, 64)]


def test_validation_names_the_argument():
    bad = [
        (dict(kind="linear", target=8), "kind"),
        (dict(kind="constant", target=0), "target"),
        (dict(kind="ramp", target=128, increment=32, ramp_samples=100), "start"),
        (dict(kind="ramp", target=128, start=32, ramp_samples=100), "increment"),
        (dict(kind="ramp", target=128, start=32, increment=32), "ramp_samples"),
        (dict(kind="ramp", target=100, start=32, increment=32, ramp_samples=100), "increment"),  # 68 % 32
        (dict(kind="ramp", target=16, start=32, increment=8, ramp_samples=100), "start"),
        (dict(kind="stages", target=16), "stages"),
        (dict(kind="stages", target=16, stages=((10, 4), (10, 8))), "stages"),
        (dict(kind="stages", target=16, stages=((10, 0),)), "stages"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            BatchSchedule(**kwargs)
    with pytest.raises(ValueError, match="samples"):
        BatchSchedule("constant", target=8).batch_at(-1)


def test_ramp_with_start_equal_to_target_is_constant():
    s = BatchSchedule("ramp", target=64, start=64, increment=16, ramp_samples=100)
    check(s, [(0, 64), (50, 64), (1000, 64)])
    assert s.all_batches() == [64]


def test_kinds():
    assert KINDS == ("constant", "ramp", "stages")
