"""Large-batch optimizers, LR and batch schedules: `from bigbatch.optim import LARS, LAMB`.

The optimizers are loaded on first use (PEP 562), so the torch-free parts of this package (registry,
rules, schedules) stay importable without torch, as config validation needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "LARS": "bigbatch.optim.lars",
    "LAMB": "bigbatch.optim.lamb",
    "Lion": "bigbatch.optim.lion",
    "ScheduleFreeAdamW": "bigbatch.optim.schedule_free",
    "Muon": "bigbatch.optim.muon",
    "peak_lr": "bigbatch.optim.lr_scaling",
    "LRSchedule": "bigbatch.optim.lr_schedule",
    "BatchSchedule": "bigbatch.optim.batch_schedule",
    "register_optimizer": "bigbatch.optim.registry",
    "OptimizerSpec": "bigbatch.optim.registry",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bigbatch.optim' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
