"""`optim.impl: apex`: NVIDIA apex's fused LAMB and LARC instead of our torch implementations.

- 'lamb' → ``apex.optimizers.FusedLAMB(params, **kwargs)``. Unless the caller passes
  ``max_grad_norm``, it is set to ``inf``: FusedLAMB's default (1.0) clips the global gradient norm
  inside the optimizer, which our LAMB never does. FusedLAMB skips the trust ratio for groups with
  weight_decay 0 (unless ``use_nvlamb=True``), which matches our excluded bias/norm groups since the
  factory gives those weight_decay 0.
- 'lars' → ``apex.parallel.LARC(torch.optim.SGD(params, lr, momentum, weight_decay, nesterov),
  trust_coefficient, clip, eps)``. kwargs ``momentum`` (0.9), ``nesterov`` (False),
  ``trust_coefficient`` (0.001), ``clip`` (False) and ``eps`` (1e-8) go to SGD/LARC with our LARS
  defaults; the rest go to SGD. Unlike our LARS, LARC adapts every group, including those marked
  ``exclude_from_adaptation``.

Both need CUDA and apex, which is not on PyPI; otherwise a ValueError tells the user to set
``optim.impl: torch`` or install apex from https://github.com/NVIDIA/apex.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from bigbatch.optim.rules import APEX_OPTIMIZERS as APEX_NAMES

_INSTALL = ("set `optim.impl: torch` to use bigbatch's own implementation, or install apex from "
            "NVIDIA's GitHub (https://github.com/NVIDIA/apex; it is not on PyPI)")


def build_apex_optimizer(name: str, params: Iterable, **kwargs: Any) -> torch.optim.Optimizer:
    """apex's fused implementation of optimizer `name` ('lamb' or 'lars'); ValueError if unavailable."""
    if name not in APEX_NAMES:
        raise ValueError(f"optim.impl: apex provides only {' and '.join(APEX_NAMES)}, not optim.name "
                         f"'{name}'; set `optim.impl: torch`")
    if not torch.cuda.is_available():
        raise ValueError(f"optim.impl: apex needs CUDA, which is not available here; {_INSTALL}")
    try:
        from apex.optimizers import FusedLAMB
        from apex.parallel import LARC
    except ImportError as err:
        raise ValueError(f"optim.impl: apex is not importable ({err}); {_INSTALL}") from err
    if name == "lamb":
        kwargs.setdefault("max_grad_norm", float("inf"))
        return FusedLAMB(params, **kwargs)
    larc_kwargs = dict(trust_coefficient=kwargs.pop("trust_coefficient", 0.001),
                       clip=kwargs.pop("clip", False), eps=kwargs.pop("eps", 1e-8))
    kwargs.setdefault("momentum", 0.9)
    sgd = torch.optim.SGD(params, **kwargs)
    return LARC(sgd, **larc_kwargs)
