"""The loss-spike guard: non-finite losses, spikes against the recent median, rollback bookkeeping."""

import io
import math

import pytest
import torch

from bigbatch.training.guard import Diverged, GuardAction, NonFiniteLossError, NullGuard, SpikeGuard


def fill(guard: SpikeGuard, losses) -> None:
    for loss in losses:
        assert guard.check(loss) is GuardAction.OK
        guard.record(loss)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_is_skipped(loss):
    guard = SpikeGuard(nan="skip")
    assert guard.check(loss, step=7) is GuardAction.SKIP_STEP
    assert [(e.step, e.kind) for e in guard.events] == [(7, "nonfinite")]
    assert len(guard.history) == 0  # the trainer does not record a skipped step


def test_non_finite_loss_raises_with_nan_error():
    with pytest.raises(NonFiniteLossError, match="step 3"):
        SpikeGuard(nan="error").check(math.nan, step=3)


def test_spike_rolls_back_only_once_the_window_has_enough_losses():
    guard = SpikeGuard(spike_factor=3.0, window=50, min_history=10)
    fill(guard, [2.0] * 9)
    assert guard.check(100.0) is GuardAction.OK  # 9 losses: too few to judge, not a spike yet
    guard.record(2.0)                             # 10 accepted, median 2.0 -> threshold 6.0
    assert guard.threshold() == 6.0
    assert guard.check(6.0) is GuardAction.OK     # at the threshold: not above it
    assert guard.check(6.5, step=11) is GuardAction.ROLLBACK
    assert guard.events[-1].step == 11 and "median 2" in guard.events[-1].reason


def test_median_ignores_a_few_outliers_and_follows_the_window():
    guard = SpikeGuard(spike_factor=2.0, window=5, min_history=3)
    for loss in [1.0, 1.0, 1.0, 9.0, 1.0]:      # an accepted outlier (e.g. rollback was off)
        guard.record(loss)
    assert guard.check(2.5) is GuardAction.ROLLBACK  # median 1.0 despite the 9.0
    fill(guard, [1.5, 1.5, 1.5])                 # window is now [9, 1, 1.5, 1.5, 1.5]: median 1.5
    assert guard.threshold() == 3.0


def test_spike_without_rollback_is_logged_and_training_continues():
    guard = SpikeGuard(window=10, rollback=False)
    fill(guard, [1.0] * 10)
    assert guard.check(50.0, step=20) is GuardAction.OK
    assert [(e.step, e.kind) for e in guard.events] == [(20, "spike")]


def test_non_positive_median_disables_spike_detection():
    guard = SpikeGuard(window=10)
    fill(guard, [-1.0] * 10)
    assert guard.threshold() is None and guard.check(100.0) is GuardAction.OK


def test_rollback_skip_counts_and_growth_on_repeated_rollbacks():
    guard = SpikeGuard(skip_batches=3, max_rollbacks=2)
    assert guard.after_rollback(checkpoint_step=100) == 3
    assert [guard.take_skip() for _ in range(4)] == [True, True, True, False]
    assert guard.after_rollback(checkpoint_step=100) == 6  # same checkpoint again: skip further
    with pytest.raises(RuntimeError, match="not recovering"):
        guard.after_rollback(checkpoint_step=100)
    assert guard.after_rollback(checkpoint_step=200) == 3  # a newer checkpoint starts afresh


def test_state_round_trip_through_weights_only_load():
    guard = SpikeGuard(window=4, skip_batches=5)
    fill(guard, [1.0, 2.0, 3.0, 4.0, 5.0])   # window keeps the last 4
    guard.after_rollback(10)
    guard.take_skip()
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    restored = SpikeGuard(window=4, skip_batches=5)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert list(restored.history) == [2.0, 3.0, 4.0, 5.0] and restored.skip_remaining == 4
    assert restored.state_dict() == guard.state_dict()


def test_load_keeps_the_newest_losses_when_window_shrank_and_accepts_null_guard_state():
    guard = SpikeGuard(window=2)
    guard.load_state_dict({"history": [1.0, 2.0, 3.0], "skip_remaining": 0})
    assert list(guard.history) == [2.0, 3.0]
    guard.load_state_dict(NullGuard().state_dict())
    assert len(guard.history) == 0 and guard.skip_remaining == 0


def test_load_does_not_erase_events():
    guard = SpikeGuard()
    guard.check(math.nan, step=1)
    guard.load_state_dict({"history": [], "skip_remaining": 0})
    assert len(guard.events) == 1


def test_null_guard_never_rolls_back_but_skips_non_finite_steps():
    guard = NullGuard()
    assert guard.check(1e9) is GuardAction.OK and not guard.take_skip()
    assert guard.after_rollback(3) == 0 and guard.events == []
    assert guard.check(math.nan, step=4) is GuardAction.SKIP_STEP
    assert guard.check_grad_norm(math.inf, step=5) is GuardAction.SKIP_STEP
    assert [(e.step, e.kind) for e in guard.events] == [(4, "nonfinite"), (5, "nonfinite")]


@pytest.mark.parametrize("make", [NullGuard, SpikeGuard])
def test_consecutive_skips_end_in_diverged_and_an_accepted_step_resets_them(make):
    guard = make(max_consecutive_skips=3)
    for step in (1, 2):
        assert guard.check(math.nan, step) is GuardAction.SKIP_STEP
        guard.raise_if_diverged(step)
    guard.record(1.0)                                  # an applied step ends the streak
    guard.check_grad_norm(math.nan, 4), guard.check(math.inf, 5), guard.check(math.nan, 6)
    assert guard.state_dict()["consecutive_skips"] == 3
    with pytest.raises(Diverged, match="3 steps in a row up to step 6"):
        guard.raise_if_diverged(6)
    restored = make(max_consecutive_skips=3)
    restored.load_state_dict(guard.state_dict())       # a resume mid-streak keeps counting
    with pytest.raises(Diverged):
        restored.raise_if_diverged(6)


def test_nan_error_is_a_divergence_also_for_the_gradient_norm():
    with pytest.raises(Diverged, match="gradient norm"):
        NullGuard(nan="error").check_grad_norm(math.nan, step=2)


@pytest.mark.parametrize("kwargs", [{"nan": "ignore"}, {"spike_factor": 1.0}, {"window": 0},
                                    {"skip_batches": -1}, {"max_consecutive_skips": 0}])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="guard"):
        SpikeGuard(**kwargs)
