"""Pure helpers for an LR range test (Smith 2017; popularised by fastai's ``lr_find``).

The test trains for ``steps`` steps with the LR growing exponentially from ``min_lr`` to ``max_lr``
(``exponential_lrs``), records the training loss of every step, and stops early once the loss
diverges (``is_diverged``). ``suggest_lr`` then picks the LR where the smoothed loss falls fastest
per unit of log-LR: the steepest-descent heuristic of fastai's "steep" suggestion and of
pytorch-lr-finder (with lag-free smoothing, see its docstring). Loss values must be positive
(the divergence test is multiplicative).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def exponential_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` LRs from min_lr to max_lr (both included), evenly spaced in log space."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"min_lr/max_lr: need 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    if steps < 2:
        raise ValueError(f"steps: need at least 2, got {steps}")
    ratio = max_lr / min_lr
    lrs = [min_lr * ratio ** (i / (steps - 1)) for i in range(steps)]
    lrs[-1] = float(max_lr)
    return lrs


def is_diverged(loss: float, best_loss: float, factor: float = 4.0) -> bool:
    """True if `loss` is NaN/inf or larger than factor × the best (lowest) loss so far.

    Before any finite best exists (best_loss = inf or NaN) only non-finite losses count.
    """
    loss = float(loss)
    if not math.isfinite(loss):
        return True
    best_loss = float(best_loss)
    if not math.isfinite(best_loss):
        return False
    return loss > factor * best_loss


def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (avg = β·avg + (1−β)·loss; avg / (1 − β^(i+1)))."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta: must be in [0, 1), got {beta}")
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.95,
               skip_start: int = 0, skip_end: int = 0, diverge_factor: float = 4.0) -> float:
    """The LR at the steepest descent of the smoothed loss curve.

    1. The curve is cut at the first diverged point (``is_diverged`` against the best loss so far,
       with `diverge_factor`; NaN/inf always count), so the blow-up never enters the smoothing.
    2. The losses are smoothed with a bias-corrected EMA of factor `beta` (0: no smoothing; 0.95
       as in pytorch-lr-finder), run forward and then backward over the curve. A one-sided EMA (as
       in fastai/pytorch-lr-finder) lags and shifts the suggestion towards larger LRs by
       ~beta/(1−beta) points; the forward-backward pass has no such shift.
    3. `skip_start`/`skip_end` points are dropped at either end (noisy start, rising tail).
    4. d(loss)/d(log lr) is estimated with central differences (``numpy.gradient``) and the LR with
       the most negative slope is returned.

    The steepest point is a common, somewhat conservative choice of peak LR for this batch size;
    the other common heuristic is the LR at the loss minimum divided by ~10.
    """
    if len(lrs) != len(losses):
        raise ValueError(f"lrs/losses: need equal lengths, got {len(lrs)} and {len(losses)}")
    kept, best = 0, math.inf
    while kept < len(losses) and not is_diverged(losses[kept], best, diverge_factor):
        best = min(best, float(losses[kept]))
        kept += 1
    lrs_f = [float(x) for x in lrs[:kept]]
    smoothed = smooth(smooth(losses[:kept], beta)[::-1], beta)[::-1]  # forward-backward: no lag
    end = len(lrs_f) - skip_end
    lrs_f, smoothed = lrs_f[skip_start:end], smoothed[skip_start:end]
    if len(lrs_f) < 3:
        raise ValueError(f"losses: need at least 3 points before divergence and after skipping, "
                         f"got {len(lrs_f)}")
    if any(lr <= 0 for lr in lrs_f):
        raise ValueError("lrs: must all be > 0")
    slopes = np.gradient(np.asarray(smoothed), np.log(np.asarray(lrs_f)))
    return lrs_f[int(np.argmin(slopes))]
