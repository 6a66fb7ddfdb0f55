"""ZeRO sharding: optimizer state (zero1), plus gradients (zero2), plus parameters (zero3); DeepSpeed.

Strategies (same interface as `bigbatch.distributed.ddp`: `model`, `module`, `sync_context`,
`all_reduce_*`, `comm_metrics`, `compressor`, `local_grad_norm`), plus `build_optimizer(optim_cfg)`,
because sharding decides what the optimizer sees:

- `Zero1Strategy`: DDP with bigbatch's comm hook (so compression still works) and torch's
  `ZeroRedundancyOptimizer`, which gives each rank whole parameters to step and broadcasts the results.
  LARS/LAMB stay exact with their default local norms: every tensor is stepped whole on one rank.
- `ShardedStrategy(stage=2|3)`: FSDP2 `fully_shard` per block of `model.blocks`, then the root;
  stage 2 keeps parameters gathered between forward and backward (reshard_after_forward=False),
  stage 3 frees them after each block's forward. Parameters become dim-0 sharded DTensors. LARS/LAMB get
  `ShardGroupNorms`, which all-reduces local squared norms once per bucket, so trust ratios use the norm
  of the whole tensor, never the local shard. `torch.nn.utils.clip_grad_norm_` already returns the
  global norm for DTensor gradients (a DTensor whose `.item()` is the global value), so the trainer's
  clipping works unchanged.
- `DeepSpeedStrategy(stage=0..3)`: `deepspeed.initialize`. DeepSpeed's ZeRO (stage >= 1) hands the
  optimizer flat partitions that cut across tensors, so layer-wise trust ratios would be computed over
  arbitrary slices (DeepSpeed issue #490): LARS and LAMB are refused there (`deepspeed_problems`).

Checkpoints: a ZeroRedundancyOptimizer's state lives on its owners; `Zero1OptimizerState.before_save()`
(every rank) gathers it on rank 0, whose `state_dict()` then holds the full, world-size independent
state. Sharded states (zero2/zero3) go through torch.distributed.checkpoint: `DCPCheckpoint.save(dir)`
and `.load(dir)` are called by every rank and reshard on load, so a run saved on 4 ranks resumes on 2.
`DeepSpeedCheckpoint` offers the same two calls over DeepSpeed's own format (same world size only).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, ContextManager, Mapping

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.distributed.ddp import CommReductions, DDPStrategy, SingleProcess
from bigbatch.optim.factory import optimizer_builder, optimizer_param_groups
from bigbatch.optim.lars import local_norms
from bigbatch.distributed.rules import DEEPSPEED_STAGES, deepspeed_problems, zero_problems
from bigbatch.optim.registry import optimizer_spec

DCP_DIR = "dcp"  # sharded states live in step-N/dcp/


# ------------------------------------------------------------------------------ optimizer building

def model_param_groups(model: nn.Module, optim_cfg: Any) -> list[dict]:
    return optimizer_param_groups(model, optim_cfg)


def build_zero1_optimizer(model: nn.Module, optim_cfg: Any, process_group: Any = None):
    """`optim_cfg.name` under torch's ZeroRedundancyOptimizer, with the factory's parameter groups.

    ZeRO-1 assigns whole parameters to ranks (largest first, to the least loaded rank) and copies each
    group dict, extra keys such as `exclude_from_adaptation` included, into the local optimizer's
    groups; `lr` set on the outer groups is copied in before every local step.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    problems = zero_problems("zero1", optim_cfg.name, optim_cfg.impl)
    if problems:
        raise ValueError("; ".join(problems))
    build_local = optimizer_builder(optim_cfg)
    # A closure, not a class: ZeroRedundancyOptimizer calls `optimizer_class(groups, **defaults)`.
    return ZeroRedundancyOptimizer(model_param_groups(model, optim_cfg),
                                   optimizer_class=lambda groups: build_local(groups),
                                   process_group=process_group)


class ShardGroupNorms:
    """`norm_fn` for LARS/LAMB over FSDP2 parameters: whole-tensor L2 norms from local shards.

    Each call takes the local shard of every input, computes its squared norm, and sums them over the
    shard group in one all-reduce (float64, so the sum of shard squares loses nothing to fp32). Inputs
    that are not sharded (plain tensors, replicated DTensors) count once: other ranks send 0 for them.
    Every rank must call it with the same sequence of tensors, which LARS/LAMB guarantee when every
    rank steps the same parameters (FSDP2 gives every rank a shard, possibly empty, of each tensor).
    """

    def __init__(self, group: Any = None):
        self.group = group
        self.calls = 0  # all-reduces issued, for tests and accounting

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if not tensors:
            return torch.zeros(0)
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        norms = local_norms(local)
        squares = norms.double().square()
        if dist.get_rank(self.group) != 0:
            sharded = torch.tensor([_is_sharded(t) for t in tensors], device=squares.device)
            squares = torch.where(sharded, squares, torch.zeros_like(squares))
        dist.all_reduce(squares, group=self.group)
        self.calls += 1
        return squares.sqrt().to(norms.dtype)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor) and any(p.is_shard() for p in tensor.placements)


def build_sharded_optimizer(model: nn.Module, optim_cfg: Any, group: Any = None) -> torch.optim.Optimizer:
    """`optim_cfg.name` over FSDP2's sharded (DTensor) parameters; LARS/LAMB get `ShardGroupNorms`.

    The optimizer holds DTensors, so its state is sharded like the parameters and
    `torch.distributed.checkpoint.state_dict` can save and reshard it.
    """
    problems = zero_problems("zero3", optim_cfg.name, optim_cfg.impl)
    if problems:
        raise ValueError("; ".join(problems))
    optimizer = optimizer_builder(optim_cfg)(model_param_groups(model, optim_cfg))
    if optimizer_spec(optim_cfg.name).trust_ratio:
        optimizer.set_norm_fn(ShardGroupNorms(group))
    return optimizer


class Zero1Strategy(DDPStrategy):
    """DDP (comm hook, compression, no_sync accumulation) + ZeroRedundancyOptimizer (sharded state)."""

    name = "zero1"

    def build_optimizer(self, optim_cfg: Any):
        return build_zero1_optimizer(self.module, optim_cfg)

    def checkpoint_states(self, optimizer) -> dict:
        """The model/optimizer entries of replicated.pt; the optimizer goes through `Zero1OptimizerState`,
        whose `before_save()` every rank must call before a save."""
        return {"model": self.module, "optimizer": Zero1OptimizerState(optimizer)}


def shard_model(model: nn.Module, mesh: Any, stage: int) -> nn.Module:
    """FSDP2 in place: one unit per entry of `model.blocks` (when it has them), then the root.

    stage 2 keeps every unit's parameters gathered from forward to backward; stage 3 frees each block's
    after its forward and gathers them again in backward. The root stays gathered in both (FSDP's own
    heuristic: its parameters, embeddings and head, are needed again at once by backward).
    """
    from torch.distributed.fsdp import fully_shard

    if stage not in (2, 3):
        raise ValueError(f"stage: FSDP sharding is stage 2 or 3, got {stage}")
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=mesh, reshard_after_forward=stage == 3)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


class ShardedStrategy(CommReductions, SingleProcess):
    """zero2 / zero3 through FSDP2; `model` and `module` are the same (sharded in place) module."""

    def __init__(self, model: nn.Module, device: torch.device, stage: int):
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(model)
        self.stage, self.name = stage, f"zero{stage}"
        self.world_size = self.comm.size
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        self.model = self.module = shard_model(model, self.mesh, stage)

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        # Non-last micro-batches keep their gradients unsharded and local; the last backward
        # reduce-scatters the accumulated sum once (like DDP's no_sync).
        self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def build_optimizer(self, optim_cfg: Any) -> torch.optim.Optimizer:
        return build_sharded_optimizer(self.module, optim_cfg, self.mesh.get_group())

    def checkpoint_states(self, optimizer) -> dict:
        """The model/optimizer entries of replicated.pt: none, both are in `sharded_checkpoint`."""
        return {}

    def sharded_checkpoint(self, optimizer) -> "DCPCheckpoint":
        """Model and optimizer through DCP, into `step-N/dcp/`."""
        return DCPCheckpoint({"model": ShardedModelState(self.module),
                              "optimizer": ShardedOptimizerState(self.module, optimizer)})


# ------------------------------------------------------------------------------------ checkpoints

class Zero1OptimizerState:
    """The checkpoint store's Stateful for a ZeroRedundancyOptimizer.

    `before_save()` must run on every rank (it is a collective: each rank sends its shard to rank 0);
    `state_dict()` (rank 0, after it) is the full optimizer state, indexed like an unsharded one and
    so loadable at any world size; `load_state_dict()` on every rank keeps the rank's own shard.

    ZeroRedundancyOptimizer keeps only `state` and `param_groups` of the local optimizers' state dicts.
    Any other top-level entry (heavyball's "heavyball": SOAP's preconditioner-refresh counters) is
    taken from rank `to`'s local optimizer and handed back to every rank's local one on load. That is
    exact for entries every rank advances alike (heavyball's count `step()` calls, which every rank
    makes), not for per-parameter data, which belongs in `state`.
    """

    def __init__(self, optimizer, to: int = 0):
        self.optimizer, self.to = optimizer, to
        self._consolidated = False

    def before_save(self) -> None:
        self.optimizer.consolidate_state_dict(to=self.to)
        self._consolidated = True

    def state_dict(self) -> dict:
        if not self._consolidated:
            raise RuntimeError("Zero1OptimizerState.state_dict: call before_save() on every rank first "
                               "(the optimizer state is spread over the ranks)")
        self._consolidated = False  # one consolidation per save: a later save must not reuse it
        return {**self.optimizer.state_dict(), **_extra_entries(self.optimizer.optim.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        state = copy.deepcopy(state)  # ZeRO blanks other ranks' entries in place
        extras = _extra_entries(state)
        self.optimizer.load_state_dict({"state": state["state"], "param_groups": state["param_groups"]})
        if extras:  # through the local optimizer's own load (its hooks read them), over its loaded shard
            local = self.optimizer.optim
            local.load_state_dict({**local.state_dict(), **extras})


def _extra_entries(state: dict) -> dict:
    """A state dict's top-level entries other than torch's own two."""
    return {key: value for key, value in state.items() if key not in ("state", "param_groups")}


class ShardedModelState:
    """DCP Stateful: the FSDP2 model's sharded state dict (DTensor values, FQN keys)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class ShardedOptimizerState:
    """DCP Stateful: the optimizer state keyed by parameter FQN, sharded like the parameters.

    On a fresh optimizer `state_dict()` first makes the state exist (torch steps once with zero
    gradients and lr 0, a collective for LARS/LAMB's norms, on every rank), so DCP has tensors to load
    into; the loaded values then replace it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)


class DCPCheckpoint:
    """Sharded states saved with torch.distributed.checkpoint; `save` and `load` run on every rank.

    DCP writes one `__<rank>_0.distcp` per rank plus `.metadata` (by rank 0) and reshards on load, so
    the world size may change between save and load.
    """

    dirname = DCP_DIR  # where the store puts it inside step-N/

    def __init__(self, states: Mapping[str, Any]):
        self.states = dict(states)

    def save(self, directory: Path | str) -> dict:
        """Returns what it saved, this rank's shards (DTensors), for the store's check of `finite`."""
        import torch.distributed.checkpoint as dcp

        payload = {name: state.state_dict() for name, state in self.states.items()}
        dcp.save(payload, checkpoint_id=str(directory))  # as dcp.save(self.states) would, read once
        return payload

    def load(self, directory: Path | str) -> None:
        import torch.distributed.checkpoint as dcp

        if not Path(directory, ".metadata").is_file():
            raise ValueError(f"checkpoint: {directory} holds no DCP checkpoint (.metadata missing); it was "
                             "not saved by a zero2/zero3 run")
        dcp.load(self.states, checkpoint_id=str(directory))


# -------------------------------------------------------------------------------------- DeepSpeed

def import_deepspeed(device: torch.device):
    """`import deepspeed`, on CPU with its CPU accelerator (DS_ACCELERATOR=cpu) and a kept op cache."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-compiles the ops it uses on first use: keep them between runs.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bigbatch" / "torch_extensions"))
    try:
        import deepspeed
    except ImportError as err:
        raise ValueError(f"distributed.strategy: deepspeed is not importable ({err}); install it with "
                         "`pip install 'deepspeed==0.19.*'` or use zero1, zero2 or zero3") from err
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        _skip_inference_shm_op()
    return deepspeed


def _skip_inference_shm_op() -> None:
    """Keep DeepSpeed's CPU comm backend from compiling its shared-memory all-reduce.

    Its TorchBackend builds that C++ op (minutes of JIT compilation on a fresh machine) when it starts,
    but only `inference_all_reduce` uses it; training collectives go through torch.distributed (gloo).
    """
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm binds the name `torch` to torch.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_torch_comm, "build_shm_op", None)):
        ds_torch_comm.build_shm_op = lambda: None


def deepspeed_config(stage: int, grad_clip: float | None, micro_batch: int | None,
                     overrides: Mapping[str, Any] | None = None) -> dict:
    """The DeepSpeed JSON config bigbatch runs with: fp32 weights, bigbatch owns the batch loop.

    `managed_gradient_accumulation: false` makes every backward only accumulate and every `step()` the
    accumulation boundary, which is how the trainer already drives micro-batches (it divides the loss
    by their count itself, so DeepSpeed's gradient_accumulation_steps stays 1). Batch sizes here only
    feed DeepSpeed's logging. `overrides` (the `deepspeed.config` mapping) is merged in last.
    """
    config = {
        "train_micro_batch_size_per_gpu": micro_batch or 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip or 0.0,
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, overrides or {})


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class DeepSpeedOptimizer:
    """What the trainer sees as its optimizer under DeepSpeed: LR goes to the engine's groups, `step()`
    is `engine.step()` (reduction, clipping by `gradient_clipping`, update, zeroing gradients)."""

    def __init__(self, engine: Any):
        self.engine = engine

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def state_dict(self) -> dict:
        raise RuntimeError("DeepSpeed optimizer state is saved by DeepSpeedCheckpoint, not replicated.pt")


class DeepSpeedStrategy(CommReductions, SingleProcess):
    """DeepSpeed's engine with ZeRO `stage`; the engine exists once `build_optimizer` ran.

    The trainer's plain `loss.backward()` works for stages 1-3 (DeepSpeed hooks the forward output);
    stage 0 needs `backward(loss)` (the engine's backward). The gradient norm is only known after
    DeepSpeed's step, so the trainer must call `optimizer_step(optimizer, grad_clip)`.
    """

    name = "deepspeed"

    def __init__(self, model: nn.Module, device: torch.device, stage: int, grad_clip: float | None = None,
                 micro_batch: int | None = None, overrides: Mapping[str, Any] | None = None):
        super().__init__(model)
        if stage not in DEEPSPEED_STAGES:
            raise ValueError(f"deepspeed.stage: must be 0, 1, 2 or 3, got {stage}")
        self.deepspeed = import_deepspeed(device)
        self.world_size = self.comm.size
        self.stage, self.engine = stage, None
        self.config = deepspeed_config(stage, grad_clip, micro_batch, overrides)

    def build_optimizer(self, optim_cfg: Any) -> DeepSpeedOptimizer:
        problems = deepspeed_problems("deepspeed", self.stage, optim_cfg.name)
        if optim_cfg.impl == "apex":
            problems.append("optim.impl: apex is not supported under deepspeed; set `optim.impl: torch`")
        if problems:
            raise ValueError("; ".join(problems))
        client = optimizer_builder(optim_cfg)(model_param_groups(self.module, optim_cfg))
        self.engine, _, _, _ = self.deepspeed.initialize(model=self.module, optimizer=client,
                                                         config=copy.deepcopy(self.config),
                                                         dist_init_required=False)
        self.model = self.engine
        return DeepSpeedOptimizer(self.engine)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self, optimizer: DeepSpeedOptimizer, grad_clip: float | None) -> float:
        """engine.step() (clips to `gradient_clipping`); returns the global norm before clipping."""
        if (grad_clip or 0.0) != self.config["gradient_clipping"]:
            raise ValueError(f"optim.grad_clip: {grad_clip} differs from the DeepSpeed engine's "
                             f"gradient_clipping {self.config['gradient_clipping']}; build both from one config")
        optimizer.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def checkpoint_states(self, optimizer) -> dict:
        """The model/optimizer entries of replicated.pt: none, the engine saves both."""
        return {}

    def sharded_checkpoint(self, optimizer) -> "DeepSpeedCheckpoint":
        return DeepSpeedCheckpoint(self.engine)


class DeepSpeedCheckpoint:
    """Engine, optimizer and ZeRO partitions in DeepSpeed's own format; `save`/`load` on every rank.

    DeepSpeed's partitioned files need the same world size to load (its universal-checkpoint
    conversion is not wired here).
    """

    dirname, TAG = "deepspeed", "engine"  # files go to step-N/deepspeed/engine/

    def __init__(self, engine: Any):
        self.engine = engine

    def save(self, directory: Path | str) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory: Path | str) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG)
        if path is None:
            raise ValueError(f"checkpoint: {directory} holds no DeepSpeed checkpoint '{self.TAG}'")


# ------------------------------------------------------------------------------- memory accounting

def held_optimizer_bytes(optimizer: Any) -> int:
    """Bytes of tensors this rank holds in the optimizer state (DTensors: the local shard only).

    For a ZeroRedundancyOptimizer the local optimizer's state is what the rank steps with; the outer
    `state` only refers to the same tensors after a load, so counting it would count them twice.
    Nested states count too (heavyball keeps `{view index: {name: tensor or list of tensors}}`).
    """
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps the local one here
    return sum(value.numel() * value.element_size() for value in _state_tensors(list(inner.state.values())))


def _state_tensors(value: Any):
    """Every tensor (DTensors: the local shard) inside nested dicts, lists and tuples."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        yield value.to_local()
    elif isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _state_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _state_tensors(item)
