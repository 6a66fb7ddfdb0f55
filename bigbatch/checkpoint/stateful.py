"""The Stateful protocol, plus the two small Statefuls every run has: RNG streams and counters.

Everything that changes during training exposes `state_dict()` / `load_state_dict()`, and every
state must survive `torch.save` then `torch.load(weights_only=True)`: tensors, lists, tuples, dicts,
str, int, float, bool and None only. That is why the RNG states below are converted to tensors and
plain ints instead of being stored as the tuples and numpy arrays their libraries hand out.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

log = logging.getLogger(__name__)


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """The global RNG streams of this process: python `random`, numpy's legacy global RNG, torch CPU
    and every CUDA device. Per-rank state: each rank draws its own dropout / augmentation stream.

    CUDA states (one per device) are saved when this process has initialised CUDA. On load, a
    checkpoint without CUDA states leaves the CUDA generators alone; with a different device count,
    the devices both sides have are restored and a warning names the mismatch.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss_next = random.getstate()
        kind, keys, pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
        state = {
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gauss)},
            "torch": torch.get_rng_state(),
            "cuda": [],
        }
        # Uninitialised CUDA has drawn nothing since it was seeded, so there is nothing to save, and a
        # CPU-only run on a GPU node is not made to initialise CUDA by checkpointing.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        self._load_cuda(list(state.get("cuda", [])))

    @staticmethod
    def _load_cuda(saved: list[torch.Tensor]) -> None:
        if not saved:
            return
        if not torch.cuda.is_available():
            log.warning("checkpoint holds CUDA RNG states but CUDA is not available; they are ignored")
            return
        count = torch.cuda.device_count()
        if count != len(saved):
            log.warning("checkpoint holds CUDA RNG states for %d device(s), this process sees %d; "
                        "restoring the first %d", len(saved), count, min(count, len(saved)))
        for index, rng in enumerate(saved[:count]):
            torch.cuda.set_rng_state(rng, device=index)


_BUILTIN = ("step", "samples", "epoch")


class Counters:
    """Where the run stands: optimizer steps, samples consumed, epoch, plus any named counters.

    Named counters are plain attributes after `add`: `counters.add("tokens", 0)` then
    `counters.tokens += 4096`. Values are int or float (a float counter must stay finite).
    """

    def __init__(self, step: int = 0, samples: int = 0, epoch: int = 0, **named: int | float):
        self.step, self.samples, self.epoch = step, samples, epoch
        self._names: list[str] = []
        for name, value in named.items():
            self.add(name, value)

    def add(self, name: str, value: int | float = 0) -> None:
        """Declare a named counter (idempotent: an existing counter keeps its value)."""
        if name in _BUILTIN or name.startswith("_") or not name.isidentifier() or hasattr(type(self), name):
            raise ValueError(f"counter name {name!r} is reserved or not an identifier")
        if name not in self._names:
            self._names.append(name)
            setattr(self, name, _check_number(name, value))

    def named(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in self._names}

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.step), "samples": int(self.samples), "epoch": int(self.epoch),
                "named": {name: _check_number(name, value) for name, value in self.named().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples, self.epoch = (int(state[k]) for k in _BUILTIN)
        for name, value in state.get("named", {}).items():
            self.add(name)
            setattr(self, name, _check_number(name, value))

    def __repr__(self) -> str:
        fields = {k: getattr(self, k) for k in _BUILTIN} | self.named()
        return "Counters(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Counters) and self.state_dict() == other.state_dict()


def _check_number(name: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"counter {name!r} must be an int or a float, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"counter {name!r} is not finite: {value}")
    return value
