"""DiLoCo: replicas train alone for H inner steps, then take one outer step on the averaged change.

Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language Models". The world
is k replicas x m ranks. Inside a replica the m ranks are ordinary DDP (a gradient all-reduce every
step over a fast link); across replicas nothing is exchanged for H steps. Every H inner steps:

    delta_r  = theta_global - theta_local_r          per parameter; the pseudo-gradient of replica r
    delta    = mean_r delta_r                        all-reduce across replicas (optionally compressed)
    theta_global = OuterOpt(theta_global, grad=delta)    SGD + Nesterov momentum by default
    theta_local_r = theta_global                     every replica restarts from the same weights

With outer SGD(lr=1, momentum=0) this is plain periodic parameter averaging. The inner optimizer
(the trainer's) is never touched, so its state (momentum, Adam moments) carries over each outer step
and stays different per replica.

Process groups (`replica_groups`): ranks [r*m, r*m + m) form replica r (intra group: DDP); the
cross group of position j holds rank j of every replica. Every cross group all-reduces the same
pseudo-gradient (the ranks of one replica hold identical weights), so all ranks end each outer step
with identical theta_global. That relies on every cross group's all-reduce returning the same bits
for the same inputs: always so for two replicas (a sum of two is commutative), and whenever the
groups run the same reduction order (same size and algorithm). With k > 2 on an irregular NCCL
topology the ranks of one replica could drift apart in the last bits; nothing re-synchronises them.

Communication accounting: everything the pseudo-gradient reduction sends is recorded under the one
kind `diloco_outer`, whatever kinds the compressor asks for (`grad_allreduce_fp16`, `powersgd_p`,
...), so `comm_bytes/diloco_outer` per outer step is parameters x bytes per element / compression.
Its uncompressed size goes to the cross communicator's `comm_bytes/uncompressed`. Float buffers
(BatchNorm running statistics) are averaged across replicas at every H-step boundary too, uncompressed,
under kind `diloco_buffers`; integer buffers (`num_batches_tracked`) advance identically on every
replica and are left alone. The one-off broadcast that makes every replica start from replica 0's
weights is `diloco_init`.

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication"):
`fragments=P` splits the trainable parameters (in module order) into P contiguous blocks of about
equal size; fragment f is synchronized every H steps, at the steps t with t % H == ((f+1)*H // P) % H,
so the outer traffic is spread over the cycle (the last fragment syncs on multiples of H, and P=1 is
DiLoCo). `sync_delay=tau` overlaps a fragment's exchange with tau further inner steps, with the
semantics of torchft's `fragment_sync_delay` / `fragment_update_alpha`: tau steps before the sync
step, the fragment's pseudo-gradient is taken (delta_r = theta_global - theta_local_r at that moment)
and its reduction started (an async work handle; PowerSGD and int8/int4, whose collectives are not
one async call, finish theirs right there); on the sync step the result is awaited, the outer
optimizer steps theta_global with it, and the replicas take `theta_local = mixing * theta_local +
(1 - mixing) * theta_global` (the paper's alpha, applied to the local weights as they are then, tau
steps after the delta was taken). mixing 0 replaces (the tau steps' local progress on that fragment
is dropped, and replicas stay identical), 1 keeps the local weights (theta_global still moves and is
what later pseudo-gradients are taken against). tau < H // P (validated), so an exchange starts after
the previous fragment was applied: at most one is in flight. tau = 0 is the blocking exchange.

Synchronous warm start (`warmup_steps=W`, a multiple of H; the DiLoCo paper starts its replicas
from a model pretrained data-parallel): for the first W inner steps the replicas train as one
data-parallel job. Before each of those optimizer steps every rank's gradients (already averaged inside
its replica by DDP) are averaged over the cross group, kind `diloco_warmup`, so every replica steps with
the whole batch's gradient: identical weights, norms, clipping and inner optimizer states everywhere.
No exchange and no outer step happen then. After step W, theta_global is set to those weights, float
buffers are averaged, the outer momentum is zero, and the H-step cycles (and the fragments' staggered
schedule, tau and the compressor) count from W: the first outer step is at W + H. The step counter
decides the phase, so a checkpoint mid-warm-up resumes exactly. A weight average (`ema`) follows
theta_global, so its first update is the first outer step after the warm-up.

Checkpoints: theta_global, the outer optimizer and the step counters are identical on every rank
(`replicated_state()`); the compressor's state (PowerSGD error feedback) is per rank
(`per_rank_state()`). An exchange in flight when a checkpoint is saved is finished first (its result
is the same on every rank) and its averaged pseudo-gradient saved with the replicated state, so the
resumed run applies it at its sync step exactly as the uninterrupted run does. Mid-cycle, the local model and the inner optimizer differ per replica, so a run
resumed mid-cycle continues exactly only if those are checkpointed per rank too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future
from torch.nn.parallel import DistributedDataParallel

from bigbatch.compression.base import (Compressor, NoCompression, all_reduce_flat, flatten,
                                       group_by_dtype, unflatten_into)
from bigbatch.compression.ddp_hook import param_names_by_id, register_compression_hook
from bigbatch.compression.factory import build_compressor
from bigbatch.compression.registry import compressor_spec
from bigbatch.comm import Communicator
from bigbatch.distributed.ddp import CommReductions, SingleProcess, with_savings
from bigbatch.distributed.rules import (diloco_cycle_problems, diloco_replica_problems, diloco_warmup_problems,
                                        outer_optimizer_problems)

OUTER_KIND = "diloco_outer"
BUFFERS_KIND = "diloco_buffers"
INIT_KIND = "diloco_init"
WARMUP_KIND = "diloco_warmup"
OUTER_OPTIMIZERS = ("sgd",)
OUTER_OPTIMIZER_SETTINGS = ("name", "lr", "momentum", "nesterov")


# -- process groups ------------------------------------------------------------------------------
def replica_groups(world_size: int, replicas: int) -> tuple[list[list[int]], list[list[int]]]:
    """(intra-replica groups, cross-replica groups) as rank lists for k=`replicas` replicas of
    m = world_size / k ranks: replica r is ranks [r*m, r*m + m); cross group j holds rank j of each."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"diloco.replicas must be an integer >= 1, got {replicas!r}")
    _raise_first(diloco_replica_problems(world_size, replicas))
    per_replica = world_size // replicas
    intra = [list(range(r * per_replica, (r + 1) * per_replica)) for r in range(replicas)]
    cross = [list(range(j, world_size, per_replica)) for j in range(per_replica)]
    return intra, cross


def make_groups(rank: int, world_size: int, replicas: int) -> tuple[Any, Any]:
    """This rank's (intra-replica, cross-replica) torch process groups.

    `dist.new_group` is collective over the world: every rank creates every group, in the same
    order, including the groups it is not a member of.
    """
    intra_ranks, cross_ranks = replica_groups(world_size, replicas)
    mine: dict[str, Any] = {}
    for label, groups in (("intra", intra_ranks), ("cross", cross_ranks)):
        for ranks in groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[label] = group
    return mine["intra"], mine["cross"]


# -- configuration helpers -----------------------------------------------------------------------
def _raise_first(problems: list[str]) -> None:
    """Constructor-level guard for values that did not come through bigbatch.validate."""
    if problems:
        raise ValueError(problems[0])


def build_outer_optimizer(params: Sequence[Tensor], name: str = "sgd", lr: float = 0.7,
                          momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    """The outer optimizer over theta_global; the paper's default is SGD(0.7, Nesterov 0.9)."""
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"diloco.outer_optimizer.name must be one of {OUTER_OPTIMIZERS}, got {name!r}")
    if not lr > 0:
        raise ValueError(f"diloco.outer_optimizer.lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"diloco.outer_optimizer.momentum must be in [0, 1), got {momentum}")
    _raise_first(outer_optimizer_problems(momentum, nesterov))
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, nesterov=nesterov)


def check_outer_optimizer_settings(settings: Mapping[str, Any]) -> None:
    """Reject keys `build_outer_optimizer` does not take, naming the config path."""
    unknown = sorted(set(settings) - set(OUTER_OPTIMIZER_SETTINGS))
    if unknown:
        raise ValueError(f"unknown diloco.outer_optimizer setting(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(OUTER_OPTIMIZER_SETTINGS)}")


def build_pseudo_grad_compressor(method: str = "none", **settings: Any) -> Compressor:
    """The compressor for the outer all-reduce (`diloco.compression`): none | fp16 | bf16 | powersgd |
    int8 | int4, with PowerSGD's settings (rank, start_step, ...) and the quantizers' block_size.
    PowerSGD's `start_step` counts outer steps (fragment synchronisations under Streaming DiLoCo),
    not inner steps."""
    compressor_spec(method, "diloco.compression.method", pseudo_gradients=True)  # ValueError naming choices
    compressor = build_compressor(method, **settings)
    assert compressor is not None  # only torch_powersgd gives None
    return compressor


def split_fragments(sizes: Sequence[int], fragments: int) -> list[range]:
    """`fragments` contiguous, non-empty index ranges over tensors of `sizes` elements, each closing
    once the running total reaches its share (Streaming DiLoCo's sequential fragments)."""
    if fragments > len(sizes):
        raise ValueError(f"diloco.fragments={fragments} exceeds the model's {len(sizes)} trainable "
                         "parameter tensors; use at most that many fragments")
    total, running, bounds = sum(sizes), 0, [0]
    for i, size in enumerate(sizes):
        running += size
        cuts_left = fragments - len(bounds)  # inner boundaries still to place
        if cuts_left == 0:
            break
        # Cut at the share, or now if every later fragment needs one of the remaining tensors.
        if running * fragments >= total * len(bounds) or len(sizes) - (i + 1) == cuts_left:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [range(bounds[f], bounds[f + 1]) for f in range(fragments)]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (parameter names without the `module.` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class RelabeledCommunicator(Communicator):
    """Another communicator's group and accounting tables, with every collective recorded under one
    kind: the compressor picks its own kinds, the outer step wants them all under `diloco_outer`."""

    def __init__(self, inner: Communicator, kind: str):
        super().__init__(group=inner.group, synchronize_cuda=inner.synchronize_cuda)
        self.inner, self.kind = inner, kind

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def rank(self) -> int:
        return self.inner.rank

    def record(self, kind: str, nbytes: float, seconds: float = 0.0) -> None:
        self.inner.record(self.kind, nbytes, seconds)

    def add_uncompressed(self, nbytes: float) -> None:
        self.inner.add_uncompressed(nbytes)

    # The transport is the inner communicator's (torch.distributed, or a LocalGroup in tests).
    def _all_reduce(self, tensor: Tensor, op: str, async_op: bool) -> Any:
        return self.inner._all_reduce(tensor, op, async_op)

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self.inner._all_gather(tensor)

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        self.inner._broadcast(tensor, src)

    def _barrier(self) -> None:
        self.inner._barrier()


def broadcast_flat(tensors: Sequence[Tensor], comm: Communicator, src: int, kind: str) -> None:
    """Copy group rank `src`'s `tensors` to every rank, one broadcast per (device, dtype)."""
    if comm.size == 1:
        return
    for group in group_by_dtype([t for t in tensors if t.numel() > 0]):
        flat = flatten(group)
        comm.broadcast(flat, src, kind)
        unflatten_into(flat, group)


@dataclass
class Exchange:
    """One fragment's pseudo-gradient reduction, started and not yet applied: `deltas` hold the
    replicas' mean once `future` has completed (None: already complete, e.g. loaded from a checkpoint)."""

    fragment: int
    names: list[str]
    deltas: list[Tensor]
    future: Future | None = None

    def wait(self) -> list[Tensor]:
        if self.future is not None:
            self.future.wait()  # re-raises a failed collective
            self.future = None
        return self.deltas


# -- the algorithm -------------------------------------------------------------------------------
class DiLoCo:
    """theta_global, the outer optimizer and the H-step schedule; see the module docstring.

    `cross_comm` spans the replicas (one rank per replica). Construction is collective over it: it
    broadcasts replica 0's parameters and buffers, so every replica starts from the same point.
    """

    def __init__(self, module: nn.Module, cross_comm: Communicator, inner_steps: int,
                 outer_optimizer: Mapping[str, Any] | None = None, compressor: Compressor | None = None,
                 offload: bool = True, fragments: int = 1, mixing: float = 0.0, sync_delay: int = 0,
                 warmup_steps: int = 0):
        module = unwrap(module)
        self._check(inner_steps, fragments, mixing, sync_delay, warmup_steps)
        self.cross_comm, self.outer_comm = cross_comm, RelabeledCommunicator(cross_comm, OUTER_KIND)
        self.compressor = compressor if compressor is not None else NoCompression()
        self.inner_steps, self.offload, self.mixing = inner_steps, offload, float(mixing)
        self.sync_delay, self.warmup_steps = sync_delay, warmup_steps
        self.pending: Exchange | None = None  # started tau steps before its sync step
        self.step = 0  # inner steps taken
        self.outer_step = 0  # fragment synchronisations done (outer steps when fragments == 1)
        with torch.no_grad():
            broadcast_flat([t for t in module.state_dict().values() if isinstance(t, Tensor)],
                           cross_comm, src=0, kind=INIT_KIND)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.global_params = {name: self._global_copy(param) for name, param in named}
        settings = dict(outer_optimizer or {})
        check_outer_optimizer_settings(settings)
        self.outer_optimizer = build_outer_optimizer(list(self.global_params.values()), **settings)
        names = list(self.global_params)
        cross_comm.record(OUTER_KIND, 0)  # a metrics column from the first step, not the first sync
        self.fragments = [[names[i] for i in block]
                          for block in split_fragments([p.numel() for _, p in named], fragments)]

    @staticmethod
    def _check(inner_steps: int, fragments: int, mixing: float, sync_delay: int, warmup_steps: int) -> None:
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"diloco.inner_steps must be an integer >= 1, got {inner_steps!r}")
        if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
            raise ValueError(f"diloco.fragments must be an integer >= 1, got {fragments!r}")
        if isinstance(sync_delay, bool) or not isinstance(sync_delay, int) or sync_delay < 0:
            raise ValueError(f"diloco.sync_delay must be an integer >= 0, got {sync_delay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"diloco.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        _raise_first(diloco_cycle_problems(inner_steps, fragments, sync_delay)
                     + diloco_warmup_problems(warmup_steps, inner_steps))
        if not 0 <= mixing <= 1:
            raise ValueError(f"diloco.mixing must be in [0, 1], got {mixing}")

    def _global_copy(self, param: Tensor) -> Tensor:
        """theta_global's copy of `param`: on the CPU (pinned when it feeds a GPU) when offloading."""
        if not self.offload or param.device.type == "cpu":
            return param.detach().clone()
        copy = torch.empty(param.shape, dtype=param.dtype, pin_memory=torch.cuda.is_available())
        return copy.copy_(param.detach())

    # -- schedule --------------------------------------------------------------------------------
    def due_fragment(self, step: int) -> int | None:
        """The fragment synchronised after inner step `step` (1-based), or None. The cycles count
        from the end of the warm-up: none is due during it."""
        cycle_step = step - self.warmup_steps
        if cycle_step < 1:
            return None
        count, phase = len(self.fragments), cycle_step % self.inner_steps
        for fragment in range(count):
            if phase == ((fragment + 1) * self.inner_steps // count) % self.inner_steps:
                return fragment
        return None

    def maybe_outer_step(self, model: nn.Module) -> dict[str, float]:
        """Count one inner step; start the exchange due tau steps from now, and on a sync step run
        the outer step. Returns its metrics (or {})."""
        module = unwrap(model)
        self.step += 1
        if self.step <= self.warmup_steps:
            if self.step == self.warmup_steps:
                self._end_warmup(module)
            return {}
        starting = self.due_fragment(self.step + self.sync_delay)
        if starting is not None:  # tau = 0: the same fragment as the sync below, started just before
            self._start_exchange(module, starting)
        fragment = self.due_fragment(self.step)
        metrics: dict[str, float] = {}
        if fragment is not None:
            metrics = self._apply_exchange(module, fragment)
        if (self.step - self.warmup_steps) % self.inner_steps == 0:
            self._average_buffers(module)
        return metrics

    # -- the synchronous warm-up -----------------------------------------------------------------
    @property
    def warming_up(self) -> bool:
        """The step about to be taken is one of the first `warmup_steps`: gradients are averaged
        across replicas before it (`sync_warmup_gradients`) and no outer step follows."""
        return self.step < self.warmup_steps

    @torch.no_grad()
    def sync_warmup_gradients(self, model: nn.Module) -> None:
        """During the warm-up, average this rank's gradients over the cross-replica group (after DDP
        averaged them inside the replica), so every replica steps with the whole batch's gradient."""
        if not self.warming_up:
            return
        grads = [p.grad for p in unwrap(model).parameters() if p.grad is not None]
        if grads:
            all_reduce_flat(grads, self.cross_comm, WARMUP_KIND)

    @torch.no_grad()
    def _end_warmup(self, module: nn.Module) -> None:
        """The replicas hold identical weights (identical averaged gradients, identical optimizer
        states): they become theta_global, from which the first cycle starts with zero outer momentum.
        BatchNorm statistics were updated on each replica's own batches: averaged here."""
        for name, param in module.named_parameters():
            if name in self.global_params:
                self.global_params[name].copy_(param.detach())
        self.outer_optimizer.state.clear()  # never stepped during the warm-up: already empty
        self._average_buffers(module)

    # -- the outer step --------------------------------------------------------------------------
    def _fragment_params(self, module: nn.Module, names: list[str]) -> list[Tensor]:
        params = dict(module.named_parameters())
        missing = [name for name in names if name not in params]
        if missing:
            raise ValueError(f"DiLoCo: the model has no parameter(s) {missing[:3]}; pass the module "
                             "DiLoCo was built with")
        return [params[name] for name in names]

    @torch.no_grad()
    def _start_exchange(self, module: nn.Module, fragment: int) -> None:
        """Take the fragment's pseudo-gradient now and start averaging it across replicas."""
        if self.pending is not None:
            raise RuntimeError(f"DiLoCo: fragment {self.pending.fragment}'s exchange is still pending at "
                               f"step {self.step}, when fragment {fragment}'s starts (was diloco.sync_delay "
                               "changed on resume?)")
        names = self.fragments[fragment]
        local = self._fragment_params(module, names)
        deltas = [self.global_params[n].to(p.device) - p for n, p in zip(names, local)]  # global - local
        future = self.compressor.reduce_async(list(zip(names, deltas)), self.outer_comm)
        self.compressor.end_step()
        self.pending = Exchange(fragment, names, deltas, future)

    @torch.no_grad()
    def _apply_exchange(self, module: nn.Module, fragment: int) -> dict[str, float]:
        """Wait for the fragment's mean pseudo-gradient, step theta_global with it, mix the replicas."""
        exchange = self.pending
        if exchange is None or exchange.fragment != fragment:
            raise RuntimeError(f"DiLoCo: fragment {fragment} is due at step {self.step} but its exchange "
                               "was never started (was diloco.sync_delay changed on resume?)")
        deltas = exchange.wait()
        self.pending = None
        local = self._fragment_params(module, exchange.names)
        glob = [self.global_params[name] for name in exchange.names]
        norm = torch.linalg.vector_norm(torch.stack([d.float().norm() for d in deltas])).item()
        for g, d in zip(glob, deltas):
            g.grad = d.to(g.device)
        self.outer_optimizer.step()  # steps only this fragment: the others have no grad
        for g in glob:
            g.grad = None
        for g, p in zip(glob, local):
            fresh = g.to(p.device)
            if self.mixing:
                p.lerp_(fresh, 1.0 - self.mixing)  # mixing * local + (1 - mixing) * global
            else:
                p.copy_(fresh)
        self.outer_step += 1
        metrics = {"diloco_outer_step": self.outer_step, "diloco_pseudo_grad_norm": norm}
        if len(self.fragments) > 1:
            metrics["diloco_fragment"] = fragment
        return metrics

    @torch.no_grad()
    def _average_buffers(self, module: nn.Module) -> None:
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            all_reduce_flat(buffers, self.cross_comm, BUFFERS_KIND)

    # -- state -----------------------------------------------------------------------------------
    def replicated_state(self) -> "DiLoCoReplicatedState":
        """theta_global, outer optimizer, counters: the same on every rank (rank 0 saves it)."""
        return DiLoCoReplicatedState(self)

    def per_rank_state(self) -> "DiLoCoPerRankState":
        """The compressor's state (PowerSGD error feedback differs per rank)."""
        return DiLoCoPerRankState(self)

    def state_dict(self) -> dict[str, Any]:
        return {"replicated": self.replicated_state().state_dict(),
                "per_rank": self.per_rank_state().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replicated_state().load_state_dict(state["replicated"])
        self.per_rank_state().load_state_dict(state["per_rank"])


class DiLoCoReplicatedState:
    """The part of DiLoCo's state every rank holds identically (a Stateful)."""

    def __init__(self, diloco: DiLoCo):
        self.diloco = diloco

    def state_dict(self) -> dict[str, Any]:
        d = self.diloco
        return {"step": d.step, "outer_step": d.outer_step, "inner_steps": d.inner_steps,
                "warmup_steps": d.warmup_steps,
                "global_params": {name: t.detach().cpu().clone() for name, t in d.global_params.items()},
                "outer_optimizer": d.outer_optimizer.state_dict(), "pending": self._pending_state()}

    def _pending_state(self) -> dict[str, Any] | None:
        """The exchange in flight (tau > 0), finished now: its mean is the same on every rank."""
        exchange = self.diloco.pending
        if exchange is None:
            return None
        deltas = exchange.wait()
        return {"fragment": exchange.fragment,
                "deltas": {name: d.detach().cpu().clone() for name, d in zip(exchange.names, deltas)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        d = self.diloco
        self._check_warmup(int(state["step"]), int(state.get("warmup_steps", 0)))  # absent: before warm-up
        saved, expected = set(state["global_params"]), set(d.global_params)
        if saved != expected:
            raise ValueError("DiLoCo checkpoint parameters do not match the model: missing "
                             f"{sorted(expected - saved)[:3]}, unexpected {sorted(saved - expected)[:3]}")
        for name, tensor in state["global_params"].items():
            d.global_params[name].copy_(tensor)
        d.outer_optimizer.load_state_dict(state["outer_optimizer"])
        d.step, d.outer_step = int(state["step"]), int(state["outer_step"])
        self._load_pending(state.get("pending"))  # absent in checkpoints from before sync_delay

    def _check_warmup(self, step: int, saved: int) -> None:
        """A checkpoint taken before the end of either warm-up (the saved or the configured one) has
        no theta_global from the other's end: the phases disagree, refuse."""
        configured = self.diloco.warmup_steps
        if saved != configured and step < max(saved, configured):
            raise ValueError(f"DiLoCo checkpoint at step {step} was saved with diloco.warmup_steps={saved}; "
                             f"resuming it with {configured} would change the warm-up it is in; keep "
                             f"diloco.warmup_steps: {saved}")

    def _load_pending(self, saved: dict[str, Any] | None) -> None:
        d = self.diloco
        if d.pending is not None:
            d.pending.wait()  # a rollback mid-flight: let the collective finish before dropping it
        d.pending = None
        if saved is None:
            return
        fragment = int(saved["fragment"])
        names = d.fragments[fragment] if fragment < len(d.fragments) else []
        if list(saved["deltas"]) != names:
            raise ValueError(f"DiLoCo checkpoint: the exchange in flight holds {list(saved['deltas'])[:3]}, "
                             f"not fragment {fragment} of this model; keep diloco.fragments as saved")
        d.pending = Exchange(fragment, names, [t.clone() for t in saved["deltas"].values()])


class DiLoCoPerRankState:
    """The part of DiLoCo's state that differs per rank: the pseudo-gradient compressor's (a Stateful)."""

    def __init__(self, diloco: DiLoCo):
        self.diloco = diloco

    def state_dict(self) -> dict[str, Any]:
        return {"compressor": self.diloco.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.diloco.compressor.load_state_dict(state["compressor"])


# -- the trainer's strategy ----------------------------------------------------------------------
def _sum_stats(tables: Sequence[dict[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for table in tables:
        for key, value in table.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


class DiLoCoStrategy(CommReductions, SingleProcess):
    """DDP inside each replica, DiLoCo across replicas; the trainer's strategy interface.

    `all_reduce_*` (loss, eval totals, preemption flags) run over the whole world, across replicas:
    the logged loss is the mean over every replica's batch share and every rank takes the same
    decisions. Mid-cycle, that loss (and any evaluation) averages replicas with different weights.
    With `count_intra_bytes` the intra-replica gradient all-reduce goes through bigbatch's comm hook
    with `NoCompression`, so its bytes appear as `grad_allreduce`. The loop calls `after_step` after
    every step, before `comm_metrics`, so an outer step's bytes land in its own row.
    Without a process group (one process) this is DiLoCo with one replica: a Lookahead-style outer
    optimizer around the inner one.
    """

    def __init__(self, model: nn.Module, device: torch.device, replicas: int, inner_steps: int,
                 outer_optimizer: Mapping[str, Any] | None = None, compressor: Compressor | None = None,
                 offload: bool = True, bucket_cap_mb: float = 25.0, count_intra_bytes: bool = True,
                 fragments: int = 1, mixing: float = 0.0, sync_delay: int = 0, warmup_steps: int = 0):
        super().__init__(model)
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        replica_groups(world, replicas)  # validates before any collective
        intra, cross = make_groups(rank, world, replicas) if distributed else (None, None)
        self.world_size, self.replicas = world, replicas
        self.ranks_per_replica, self.replica = world // replicas, rank // (world // replicas)
        self.intra_comm, self.cross_comm = Communicator(intra), Communicator(cross)
        if self.ranks_per_replica > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids, process_group=intra,
                                                 bucket_cap_mb=bucket_cap_mb)
            if count_intra_bytes:
                register_compression_hook(self.model, NoCompression(), self.intra_comm,
                                          param_names_by_id(model), observer=self.local_grad_norm)
        self.diloco = DiLoCo(model, self.cross_comm, inner_steps, outer_optimizer, compressor,
                             offload=offload, fragments=fragments, mixing=mixing, sync_delay=sync_delay,
                             warmup_steps=warmup_steps)

    def sync_context(self, last_micro_step: bool) -> ContextManager:
        if last_micro_step or self.model is self.module:
            return contextlib.nullcontext()
        return self.model.no_sync()  # accumulate locally; all-reduce on the last micro-batch only

    global_grad_norm = False  # replicas hold different gradients between outer steps

    def optimizer_step(self, optimizer, grad_clip: float | None) -> float:
        """During the warm-up the replicas' gradients are averaged first (identical everywhere, so
        is the norm and the clipping); afterwards each replica steps with its own."""
        self.diloco.sync_warmup_gradients(self.module)
        return super().optimizer_step(optimizer, grad_clip)

    def after_step(self, trainer: Any = None) -> dict[str, float]:
        """Counts the inner step and runs the outer step when due. The loop calls it after every
        step, including one the loss guard skipped, before `comm_metrics` (so an outer step's bytes
        land in its own row)."""
        return self.diloco.maybe_outer_step(self.module)

    def checkpoint_states(self, optimizer) -> dict:
        return {**super().checkpoint_states(optimizer), "diloco": self.diloco.replicated_state()}

    def rank_states(self, model: nn.Module, optimizer) -> dict:
        """Replicas differ inside a cycle: each rank also keeps its own model and inner optimizer
        (loaded after the replicated copy, which stays as a fallback when the world size changes)."""
        return {**super().rank_states(model, optimizer), "diloco_rank": self.diloco.per_rank_state(),
                "replica_model": model, "replica_optimizer": optimizer}

    def comm_metrics(self, trainer: Any = None) -> dict[str, float]:
        """Per-kind bytes and seconds of the world (metrics), intra-replica (grad_allreduce) and
        cross-replica (diloco_*) communicators this step. The pseudo-gradients' uncompressed size is
        `comm_bytes/diloco_outer_uncompressed`; `comm_bytes/uncompressed` stays the gradients'."""
        cross = self.cross_comm.take_step_stats()
        cross["comm_bytes/diloco_outer_uncompressed"] = cross.pop("comm_bytes/uncompressed")
        stats = with_savings(_sum_stats([self.comm.take_step_stats(), self.intra_comm.take_step_stats(), cross]))
        outer_sent = stats.get(f"comm_bytes/{OUTER_KIND}", 0.0)
        if outer_sent > 0:
            stats["diloco_outer_savings"] = stats["comm_bytes/diloco_outer_uncompressed"] / outer_sent
        return stats
