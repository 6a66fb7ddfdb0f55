"""Weight averaging (the `ema:` section): an exponential moving average (EMA) or a stochastic weight
average (SWA, the equal-weight mean of snapshots) of the weights, kept in float32 beside the model.

What is averaged is what this rank holds: the whole parameters under single/ddp/zero1 (identical on
every rank, so rank 0 saves them into replicated.pt), the local DTensor shards under zero2/zero3 (saved
sharded through DCP, beside the model, so the world size may change on resume). Under DiLoCo the
replicas' weights differ between synchronisations, so the average follows the global (outer) weights,
which every rank holds identically: it is updated after an outer synchronisation (every fragment's,
for streaming DiLoCo) and `every_steps` counts those. DeepSpeed is refused by the config rules.

Update n (1-based) moves the average toward the weights by `mix(n)`: `avg += mix(n) * (w - avg)`.

    swa                 1 / n                       (the arithmetic mean of the n snapshots)
    ema                 1 at n = 1, then 1 - decay  (starts from the first snapshot)
    ema, debias         (1 - decay) / (1 - decay^n) (Adam's bias correction of a zero-started EMA:
                                                     snapshot k weighs decay^(n-k), normalised)

Only steps that were taken update it (a skipped, non-finite step changes no weight), and only when
the step number is a multiple of `every_steps` and `start_samples` samples have been seen.
Buffers (BatchNorm statistics) are not averaged: evaluation uses the model's own.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

STATE_KEY = "weight_average"  # its entry in replicated.pt, and in step-N/dcp/ under zero2/zero3


def mix(kind: str, decay: float, debias: bool, n: int) -> float:
    """How far update n (1-based) moves the average toward the current weights (table above)."""
    if kind == "swa":
        return 1.0 / n
    if debias:
        return (1.0 - decay) / (1.0 - decay ** n)
    return 1.0 if n == 1 else 1.0 - decay


def local(tensor: Tensor) -> Tensor:
    """The tensor this rank stores: a DTensor's local shard (an alias: in-place ops reach the DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def reshard(module: nn.Module) -> None:
    """FSDP2 (zero2/zero3) leaves a unit's parameters gathered after a forward without backward (the
    root always, every unit under zero2): the next forward would use them as they are. Resharding
    makes the module's parameters the DTensor shards again, the ones to write, gathered anew next."""
    for sub in module.modules():
        if callable(getattr(sub, "reshard", None)):
            sub.reshard()


class EveryStep:
    """The clock of a strategy whose weights change at each taken optimizer step."""

    def __call__(self, step: int, taken: bool) -> tuple[int, bool]:
        return step, taken


class OuterSteps:
    """DiLoCo's clock: the global weights change only at a synchronisation (a fragment's, when
    streaming), whether or not this inner step was taken; `every_steps` counts synchronisations."""

    def __init__(self, diloco: Any):
        self.diloco = diloco

    def __call__(self, step: int, taken: bool) -> tuple[int, bool]:
        d = self.diloco
        return d.outer_step, d.due_fragment(d.step) is not None


class NoAverage:
    """`ema.enabled: false`: nothing is kept, evaluated or saved."""

    count = 0
    eval_with_average = False

    def after_step(self, step: int, samples: int, taken: bool) -> None:
        pass

    def swapped_in(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def checkpoint_states(self, sharded: Any) -> dict:
        return {}


class WeightAverage:
    """The average of `sources` (name -> live tensor), updated by `after_step`; a Stateful.

    `sources` are the model's parameters (DTensor shards under FSDP2) or DiLoCo's global weights;
    the average of each lives on the same device, in float32."""

    def __init__(self, sources: Mapping[str, Tensor], kind: str = "ema", decay: float = 0.999,
                 debias: bool = False, every_steps: int = 1, start_samples: int = 0,
                 eval_with_average: bool = True, clock: Callable[[int, bool], tuple[int, bool]] | None = None):
        if kind not in ("ema", "swa"):
            raise ValueError(f"ema.kind must be ema or swa, got {kind!r}")
        self.sources = dict(sources)
        self.kind, self.decay, self.debias = kind, float(decay), debias
        self.every_steps, self.start_samples = every_steps, start_samples
        self.eval_with_average = eval_with_average
        self.clock = clock or EveryStep()
        with torch.no_grad():
            self.average = {name: t.detach().to(torch.float32, copy=True) for name, t in self.sources.items()}
        self.count = 0  # updates so far; 0: there is no average yet
        self.tensors_sharded = False  # set by checkpoint_states when DCP saves the tensors

    def after_step(self, step: int, samples: int, taken: bool) -> None:
        """After every optimizer step (taken or skipped) with the counters after it."""
        tick, changed = self.clock(step, taken)
        if changed and tick % self.every_steps == 0 and samples >= self.start_samples:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        weight = mix(self.kind, self.decay, self.debias, self.count)
        averages = [local(a) for a in self.average.values()]
        current = [local(self.sources[name]).to(torch.float32) for name in self.average]
        torch._foreach_lerp_(averages, current, weight)  # avg + weight * (w - avg), one pass

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """The module runs with the averaged weights inside, its own (bitwise) after; a no-op before
        the first update. Parameters are found by name (the bare module's names)."""
        if self.count == 0:
            yield
            return
        reshard(module)
        params = dict(module.named_parameters())
        targets = [params[name] for name in self.average]
        with torch.no_grad():
            saved = [p.detach().clone() for p in targets]
            for p, a in zip(targets, self.average.values()):
                p.copy_(a)
        try:
            yield
        finally:
            reshard(module)
            with torch.no_grad():
                for p, s in zip(targets, saved):
                    p.copy_(s)

    def checkpoint_states(self, sharded: Any) -> dict:
        """Entries for replicated.pt. Under DCP (zero2/zero3: `sharded` has `states`) the tensors go
        into step-N/dcp/ as DTensor shards and replicated.pt keeps the count."""
        states = getattr(sharded, "states", None)
        if isinstance(states, dict):
            self.tensors_sharded = True
            states[STATE_KEY] = AverageTensors(self)
        return {STATE_KEY: self}

    def state_dict(self) -> dict[str, Any]:
        state = {"kind": self.kind, "count": self.count}
        if not self.tensors_sharded:
            state["average"] = self.average
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind and state["count"]:
            raise ValueError(f"checkpoint: its weight average is {state['kind']}, this run's ema.kind is "
                             f"{self.kind}; keep ema.kind as saved")
        self.count = int(state["count"])
        if "average" in state:
            copy_into(self.average, state["average"])


class AverageTensors:
    """DCP Stateful of the averaged DTensor shards (zero2/zero3); DCP loads into them in place."""

    def __init__(self, owner: WeightAverage):
        self.owner = owner

    def state_dict(self) -> dict[str, Any]:
        return {"average": dict(self.owner.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            copy_into(self.owner.average, state["average"])


def copy_into(average: dict[str, Tensor], saved: Mapping[str, Tensor]) -> None:
    if set(saved) != set(average):
        raise ValueError("checkpoint: the weight average's parameters do not match the model: missing "
                         f"{sorted(set(average) - set(saved))[:3]}, unexpected {sorted(set(saved) - set(average))[:3]}")
    for name, tensor in average.items():
        if saved[name] is not tensor:
            tensor.copy_(saved[name])


def build_weight_average(cfg: Any, strategy: Any) -> WeightAverage | NoAverage:
    """The `ema:` section over what the strategy's ranks hold (see the module docstring)."""
    if not cfg.enabled:
        return NoAverage()
    diloco = getattr(strategy, "diloco", None)
    if diloco is not None:
        sources, clock = diloco.global_params, OuterSteps(diloco)
    else:
        sources = {name: p for name, p in strategy.module.named_parameters() if p.requires_grad}
        clock = EveryStep()
    return WeightAverage(sources, kind=cfg.kind, decay=cfg.decay, debias=cfg.debias,
                         every_steps=cfg.every_steps, start_samples=cfg.start_samples,
                         eval_with_average=cfg.eval_with_ema, clock=clock)


def averaged_weights(step_dir: Path | str) -> dict[str, Tensor]:
    """The averaged weights (parameter name -> full float32 tensor) of a checkpoint directory, read in
    one process whichever strategy saved it; empty when the run kept no average (or before its first
    update)."""
    step_dir = Path(step_dir)
    state = torch.load(step_dir / "replicated.pt", map_location="cpu", weights_only=True).get(STATE_KEY)
    if not state or not state["count"]:
        return {}
    if "average" in state:
        return dict(state["average"])
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:  # DCP's shards, gathered into one file
        dcp_to_torch_save(step_dir / "dcp", Path(tmp) / "all.pt")
        everything = torch.load(Path(tmp) / "all.pt", map_location="cpu", weights_only=True)
    return dict(everything[STATE_KEY]["average"])
