"""Peak-LR scaling rules as tables: (global_batch, expected peak LR), each row says why."""

from __future__ import annotations

import math

import pytest

from bigbatch.optim.lr_scaling import RULES, peak_lr

BASE_LR, B0, BK = 0.1, 256, 1024

TABLES = {
    "none": [
        (256, 0.1),     # the batch does not matter
        (8192, 0.1),    # still the base LR
    ],
    "linear": [
        (256, 0.1),     # B = B0: base LR
        (512, 0.2),     # twice the batch, twice the LR (Goyal et al.)
        (128, 0.05),    # half the batch, half the LR
        (8192, 3.2),    # 32× batch → 32× LR
    ],
    "sqrt": [
        (256, 0.1),     # B = B0: base LR
        (1024, 0.2),    # 4× batch → 2× LR
        (64, 0.05),     # 1/4 batch → 1/2 LR
        (512, 0.1 * math.sqrt(2)),  # 2× batch → √2× LR
    ],
    "linear_then_sqrt": [
        (256, 0.1),     # B = B0: base LR
        (512, 0.2),     # below the knee: linear
        (1024, 0.4),    # at the knee: still linear (B ≤ Bk)
        (4096, 0.8),    # 4× past the knee: 0.4·√4
        (16384, 1.6),   # 16× past the knee: 0.4·√16
        (128, 0.05),    # below B0: linear downwards
    ],
}


@pytest.mark.parametrize("rule", RULES)
def test_rule_tables(rule):
    for batch, expected in TABLES[rule]:
        got = peak_lr(BASE_LR, batch, rule, B0, knee_batch=BK)
        assert got == pytest.approx(expected, rel=1e-12), (rule, batch)


def test_linear_then_sqrt_is_continuous_at_knee():
    below = peak_lr(BASE_LR, BK, "linear_then_sqrt", B0, BK)
    above = peak_lr(BASE_LR, BK + 1, "linear_then_sqrt", B0, BK)
    assert above == pytest.approx(below * math.sqrt((BK + 1) / BK))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="rule"):
        peak_lr(0.1, 512, "cubic", 256)
    with pytest.raises(ValueError, match="knee_batch"):
        peak_lr(0.1, 512, "linear_then_sqrt", 256)
    with pytest.raises(ValueError, match="base_batch"):
        peak_lr(0.1, 512, "linear", 0)
    with pytest.raises(ValueError, match="global_batch"):
        peak_lr(0.1, 0, "linear", 256)


def test_rules_tuple():
    assert RULES == ("none", "linear", "sqrt", "linear_then_sqrt")
