"""Peak learning rate as a function of the global batch B, from a base LR tuned at batch B0.

- none:              base_lr
- linear:            base_lr · B/B0                    (Goyal et al. 2017, SGD)
- sqrt:              base_lr · √(B/B0)                 (Krizhevsky 2014; Adam-family, Malladi et al. 2022)
- linear_then_sqrt:  base_lr · B/B0                    for B ≤ Bk
                     base_lr · (Bk/B0) · √(B/Bk)       for B > Bk  (continuous at the knee Bk)
"""

from __future__ import annotations

import math
from typing import Optional

RULES = ("none", "linear", "sqrt", "linear_then_sqrt")


def peak_lr(base_lr: float, global_batch: int, rule: str, base_batch: int,
            knee_batch: Optional[int] = None) -> float:
    """The peak LR for `global_batch` under `rule` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"rule: unknown LR scaling rule '{rule}'; choose one of {', '.join(RULES)}")
    if global_batch <= 0:
        raise ValueError(f"global_batch: must be > 0, got {global_batch}")
    if base_batch <= 0:
        raise ValueError(f"base_batch: must be > 0, got {base_batch}")
    ratio = global_batch / base_batch
    if rule == "none":
        return float(base_lr)
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    if knee_batch is None:
        raise ValueError("knee_batch: required by rule linear_then_sqrt")
    if knee_batch <= 0:
        raise ValueError(f"knee_batch: must be > 0, got {knee_batch}")
    if global_batch <= knee_batch:
        return base_lr * ratio
    return base_lr * (knee_batch / base_batch) * math.sqrt(global_batch / knee_batch)
