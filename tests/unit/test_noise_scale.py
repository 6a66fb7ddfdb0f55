"""Gradient noise scale estimator (McCandlish et al. 2018, appendix A)."""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch.optim.noise_scale import NoiseScaleEstimator


def test_exact_expectations_give_exact_noise_scale():
    # If the squared norms equal their expectations |G|² + tr(Σ)/B, one update recovers tr(Σ)/|G|².
    g2, tr = 2.0, 50.0
    est = NoiseScaleEstimator()
    out = est.update(g2 + tr / 8, 8, g2 + tr / 64, 64)
    assert out == pytest.approx(tr / g2, rel=1e-12)
    assert est.grad_sq == pytest.approx(g2) and est.trace == pytest.approx(tr)


def test_table_of_updates():
    # (small_sq, B_small, big_sq, B_big) rows with the unsmoothed estimates they imply; ema_decay = 0
    # means no smoothing, so each row's B_simple stands alone.
    rows = [
        # |G|² = (64·1.5 − 8·5)/56 = 1, tr = (5 − 1.5)/(1/8 − 1/64) = 32 → 32
        ((5.0, 8, 1.5, 64), 1.0, 32.0, 32.0),
        # no noise: both batches see the same norm → tr = 0, B_simple = 0
        ((3.0, 4, 3.0, 16), 3.0, 0.0, 0.0),
        # small-batch norm below the big one (unlucky sample): |G|² > 0, tr < 0, B_simple < 0
        ((1.0, 2, 2.0, 4), 3.0, -4.0, -4.0 / 3.0),
    ]
    for (s, bs, b, bb), g2, tr, b_simple in rows:
        est = NoiseScaleEstimator(ema_decay=0.0)
        assert est.update(s, bs, b, bb) == pytest.approx(b_simple, abs=1e-12)
        assert est.grad_sq == pytest.approx(g2) and est.trace == pytest.approx(tr, abs=1e-12)


def test_none_until_grad_sq_positive_and_bias_correction():
    est = NoiseScaleEstimator(ema_decay=0.9)
    assert est.noise_scale is None and est.grad_sq is None
    # |G|² estimate = (16·1 − 4·10)/12 = −2 < 0 → None.
    assert est.update(10.0, 4, 1.0, 16) is None
    # Second observation with |G|² = (16·5 − 4·5)/12 = 5, tr = 0. Bias-corrected EMA of |G|²:
    # (0.9·0.1·(−2) + 0.1·5) / (1 − 0.81) = (−0.18 + 0.5)/0.19.
    out = est.update(5.0, 4, 5.0, 16)
    g2 = (-0.18 + 0.5) / 0.19
    tr = 0.9 * 0.1 * ((10.0 - 1.0) / (1 / 4 - 1 / 16)) / 0.19
    assert est.grad_sq == pytest.approx(g2) and out == pytest.approx(tr / g2)


def test_non_finite_inputs_are_ignored():
    est = NoiseScaleEstimator()
    first = est.update(5.0, 8, 1.5, 64)
    assert est.update(float("inf"), 8, 1.5, 64) == first
    assert est.update(5.0, 8, float("nan"), 64) == first
    assert est.updates == 1


def test_state_dict_round_trip():
    a = NoiseScaleEstimator(0.8)
    for s, b in [(5.0, 1.5), (4.0, 1.2), (6.0, 2.0)]:
        a.update(s, 8, b, 64)
    b_ = NoiseScaleEstimator()
    b_.load_state_dict(a.state_dict())
    assert b_.ema_decay == 0.8
    assert b_.update(5.5, 8, 1.7, 64) == a.update(5.5, 8, 1.7, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ema_decay"):
        NoiseScaleEstimator(1.0)
    with pytest.raises(ValueError, match="small_batch"):
        NoiseScaleEstimator().update(1.0, 64, 1.0, 64)


@pytest.mark.parametrize("small_from", ["rank0", "mean_over_ranks"])
def test_linear_regression_matches_analytic_noise_scale(small_from):
    """y = x·w* + ε with x ~ N(0, I_d), ε ~ N(0, σ²), loss ½(x·w − y)², at a fixed w = w* + δ.

    Per-example gradient g = x(x·δ − ε). Its mean is G = E[xxᵀ]δ = δ. By Isserlis,
    E[ggᵀ] = E[(x·δ)² xxᵀ] + σ²I = |δ|²I + 2δδᵀ + σ²I, so Σ = (|δ|² + σ²)I + δδᵀ and
    tr(Σ) = d(|δ|² + σ²) + |δ|²;  B_simple = tr(Σ)/|G|² = d(1 + σ²/|δ|²) + 1.
    Simulate W ranks × b examples per step: small = one rank's (or each rank's, averaged) gradient
    norm², big = the all-reduced (averaged) gradient norm².
    """
    d, sigma, b, world, trials = 10, 0.5, 16, 8, 4000
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = torch.randn(d, generator=gen, dtype=torch.float64)
    delta = delta / delta.norm()  # |δ| = 1
    w = w_star + delta
    true_g2 = delta.norm().item() ** 2
    true_trace = d * (true_g2 + sigma ** 2) + true_g2
    analytic = true_trace / true_g2  # = 10·1.25 + 1 = 13.5
    assert analytic == pytest.approx(13.5)

    x = torch.randn(trials, world * b, d, generator=gen, dtype=torch.float64)
    noise = sigma * torch.randn(trials, world * b, generator=gen, dtype=torch.float64)
    y = x @ w_star + noise
    per_example = x * (x @ w - y)[..., None]                     # (trials, W·b, d)
    per_rank = per_example.view(trials, world, b, d).mean(2)    # each rank's local gradient
    big = per_rank.mean(1)                                      # the all-reduced gradient
    if small_from == "rank0":
        small_sq = (per_rank[:, 0] ** 2).sum(-1)
    else:
        small_sq = (per_rank ** 2).sum(-1).mean(1)
    big_sq = (big ** 2).sum(-1)

    est = NoiseScaleEstimator(ema_decay=0.999)
    for s, g in zip(small_sq.tolist(), big_sq.tolist()):
        out = est.update(s, b, g, world * b)
    assert out is not None and math.isfinite(out)
    assert abs(out / analytic - 1) < 0.2, (out, analytic)
    assert abs(est.grad_sq / true_g2 - 1) < 0.2
    assert abs(est.trace / true_trace - 1) < 0.2
