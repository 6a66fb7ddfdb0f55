"""LR range-test helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bigbatch.optim.lr_finder import exponential_lrs, is_diverged, smooth, suggest_lr


def test_exponential_lrs_table():
    lrs = exponential_lrs(1e-4, 1.0, 5)
    for got, expected in zip(lrs, [
        1e-4,   # starts at min_lr
        1e-3,   # each step ×10 (4 steps span 4 decades)
        1e-2,
        1e-1,
        1.0,    # ends exactly at max_lr
    ]):
        assert got == pytest.approx(expected, rel=1e-12)
    assert exponential_lrs(0.5, 2.0, 2) == [0.5, 2.0]


def test_exponential_lrs_validation():
    with pytest.raises(ValueError, match="min_lr"):
        exponential_lrs(1.0, 0.1, 10)
    with pytest.raises(ValueError, match="min_lr"):
        exponential_lrs(0.0, 0.1, 10)
    with pytest.raises(ValueError, match="steps"):
        exponential_lrs(1e-3, 0.1, 1)


def test_is_diverged_table():
    rows = [
        (1.0, 1.0, False),             # at the best loss
        (3.9, 1.0, False),             # below 4× best
        (4.1, 1.0, True),              # above 4× best
        (float("nan"), 1.0, True),     # NaN always diverged
        (float("inf"), 1.0, True),     # inf always diverged
        (100.0, float("inf"), False),  # no best yet: only non-finite counts
    ]
    for loss, best, expected in rows:
        assert is_diverged(loss, best) is expected, (loss, best)
    assert is_diverged(2.5, 1.0, factor=2.0) is True


def test_smooth_is_bias_corrected():
    # A constant curve stays constant from the first point (no pull towards 0).
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_suggest_lr_finds_steepest_descent_without_smoothing():
    # loss = −tanh(log10(lr) + 2): steepest (per log lr) at lr = 1e-2.
    lrs = exponential_lrs(1e-5, 1.0, 51)  # 10 points per decade; 1e-2 is point 30
    losses = [2.0 - math.tanh(math.log10(lr) + 2.0) for lr in lrs]
    assert suggest_lr(lrs, losses, beta=0.0) == pytest.approx(1e-2, rel=1e-9)


def test_suggest_lr_ignores_divergence_and_noise():
    rng = np.random.default_rng(0)
    lrs = exponential_lrs(1e-5, 10.0, 121)  # 20 points per decade
    losses = [2.0 - math.tanh(2 * (math.log10(lr) + 3.0)) + 0.01 * rng.standard_normal() for lr in lrs]
    # Diverging tail: the loss blows up past lr = 1, then NaN.
    losses = [l if lr < 1.0 else l * 100 for l, lr in zip(losses, lrs)]
    losses[-5:] = [float("nan")] * 5
    lr = suggest_lr(lrs, losses)  # steepest point of the clean curve: lr = 1e-3
    assert 1e-3 / 1.5 < lr < 1e-3 * 1.5


def test_suggest_lr_on_u_shaped_curve():
    # Falls (steepest at 1e-3), bottoms out, rises slowly, then diverges past 4× the best loss.
    lrs = exponential_lrs(1e-6, 10.0, 141)
    losses = [2.0 - math.tanh(2 * (math.log10(lr) + 3.0)) + 0.5 * max(0.0, math.log10(lr) + 1.5) ** 2
              for lr in lrs]
    assert any(is_diverged(l, min(losses)) for l in losses)  # the tail does diverge
    assert 1e-3 / 1.5 < suggest_lr(lrs, losses) < 1e-3 * 1.5


def test_suggest_lr_validation():
    with pytest.raises(ValueError, match="lrs/losses"):
        suggest_lr([1e-3, 1e-2], [1.0])
    with pytest.raises(ValueError, match="losses"):
        suggest_lr([1e-3, 1e-2, 1e-1], [1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="losses"):
        suggest_lr([1e-3, 1e-2, 1e-1], [1.0, 0.9, 10.0])  # third point diverged: only 2 left
    with pytest.raises(ValueError, match="losses"):
        suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [1.0, 0.9, 0.8, 0.7], skip_start=2)
