"""Memory planner behind `bigbatch plan`: per-rank bytes and the largest micro-batch that fits.

    spec = GPTSpec(n_layer=12, d_model=768, n_head=12, vocab_size=50304, seq_len=1024)
    report = plan(spec, world_size=8, device_memory_bytes=parse_bytes("80GB"), optimizer="adamw")
    print(format_plan(report))

Per-rank model state (n = parameters, s = optimizer-state bytes per parameter, N = ranks)
------------------------------------------------------------------------------------------
Parameters and gradients are fp32 (4 bytes) under both precisions: `precision: bf16` is autocast,
which keeps fp32 weights. Sharding follows the ZeRO paper's stages (Rajbhandari et al. 2020):

| strategy | params    | grads     | optimizer | comm buffers                                  |
|----------|-----------|-----------|-----------|-----------------------------------------------|
| ddp      | 4n        | 4n        | s·n       | 0 (gradients are views into DDP's buckets)    |
| zero1    | 4n        | 4n        | s·n / N   | 0 (the same DDP, bucket views)                |
| zero2    | 4n        | 4n / N    | s·n / N   | 0                                             |
| zero3    | 4n / N    | 4n / N    | s·n / N   | 4·(root + 2·largest block): gathered params   |

x / N is rounded up. The ZeRO paper's K = 12 for Adam counts an fp32 master copy beside fp16 weights;
here the weights are the fp32 copy, so Adam's state is 8 bytes. Comm buffers: DDP keeps flat
gradient buckets as large as all gradients unless `gradient_as_bucket_view=True`, which bigbatch's
ddp and zero1 set, so they are charged 0 by default (`ddp_bucket_view=False` charges the 4n); zero3 assumes FSDP2 units of one block each plus a root unit holding
the rest (embeddings, head), with the root, the running block and one prefetched block unsharded.

Optimizer state bytes per parameter (`optimizer_state_bytes`, from each registration in
`bigbatch.optim.registry`): sgd 4 (momentum buffer; 0 without
momentum), adam/adamw/lamb 8 (first and second moments), adagrad 4 (sum of squares), rmsprop 4
(+4 with momentum), lars 4 (momentum), lion 4 (one moment), schedule_free_adamw 8 (z and the second
moment; the issue's 12 counts the copy of y that `eval()` keeps with exact_restore, which exists
only while evaluating, when no activations are held, so it is not part of the training peak),
muon 4 for hidden matrices (momentum; `hidden_matrix_params`: 12·d² a GPT block) and 8 for the
AdamW rest (embeddings, head, biases, norms). Muon under zero2/zero3 also gathers one whole
matrix's update at a time for Newton–Schulz (a few × the largest matrix, transient, not counted).
soap 24 (heavyball's SOAP: two moments, and per matrix two Kronecker factors and two eigenbases);
of these strategies it runs under ddp and zero1 only, where s·n / N holds up to whole-tensor granularity
(ZeroRedundancyOptimizer balances whole parameters over the ranks).

Activations (per rank, micro-batch b): saved + working set
----------------------------------------------------------
`saved(b) = fixed + b·per_sample` is what autograd holds at the end of the forward (exactly what
`SavedTensorMeter` counts); the peak adds a working set: the block being recomputed in backward
(`none` minus the policy's bytes of one wrapped block) and the model output with its gradient
(2 × the logits for the GPT).

GPT (`GPTSpec`), derived from what autograd saves for `bigbatch.models.gpt.Block`, per sequence of T
tokens (d = width, h = heads, V = vocabulary; r = 4 bytes for the fp32 residual stream and
LayerNorm statistics, a = bytes of matmul operands: 4 in fp32, 2 under bf16 autocast):

    op (backward needs)                              saved per sequence
    ln1 (input, mean, rstd)                          r·d·T + 8·T
    qkv linear (input = ln1 output)                  a·d·T
    SDPA fused (q, k, v, output, logsumexp)          3·a·d·T + a·d·T + 4·h·T
    proj linear (input = SDPA output)                — (same storage as the SDPA output)
    ln2 (input, mean, rstd)                          r·d·T + 8·T
    fc1 linear (input = ln2 output)                  a·d·T
    GELU (input = fc1 output)                        4·a·d·T
    fc2 linear (input = GELU output)                 4·a·d·T
    block, fp32: 16·d·T + (4 + h)·T elements         (dropout p > 0 adds its mask, a·d·T)

plus, once per sequence: token ids and targets (8·T each, int64), ln_f (r·d·T + 8·T), head input
(a·d·T), cross-entropy's log-softmax (4·V·T); fixed: position ids (8·T), the loss's total weight
(4), and under bf16 the weight casts of the head and of every block not recomputed (2·12·d² each).

Why this differs from the textbook (Korthikanti et al. 2022, 34·T·d + 5·h·T² bytes per layer at
16 bits, i.e. 17·d·T + 2.5·h·T² elements; the issue's 12·L·d·T + L·h·T² + 2·V·T elements is a
rounder version of the same model):
- No T² term: the fused SDPA kernels (`_scaled_dot_product_flash_attention_for_cpu` on CPU, flash or
  memory-efficient attention on CUDA) save q, k, v, the output and one logsumexp per row (h·T fp32)
  and recompute the softmax in backward. `attention="math"` (PyTorch's fallback, which the CPU uses
  when attention dropout is on) saves the T×T probabilities: h·T² per tensor, three with dropout
  (softmax output, dropout mask, dropped probabilities) and one without; on CPU it computes in fp32
  even under bf16 autocast, so q, k, v and the T×T tensors take 4 bytes.
- No dropout masks at p = 0 (the textbook's two 1-byte masks per layer); on CPU a mask is a tensor
  of the activation dtype, on CUDA a 1-byte bool, so with dropout the estimate is high on CUDA.
- +4·T: each LayerNorm saves its mean and 1/std per token, which the textbook leaves out.
- Loss: one V·T tensor (the log-softmax; nll_loss needs only it and the targets). The textbook's
  2·V·T counts the logits too; they are not saved, they are part of the working set.

Remat policies (see `bigbatch.memory.remat`), per wrapped block:
- full: the block's input only, r·d·T, so the total is L·r·d·T plus the fixed parts above (the
  issue's "block inputs L·d·T plus one block": the one block is the working set).
- every_k: blocks 0, k, 2k, … as full, the others as none.
- selective: the input, r·d·T, plus the outputs of the four linears (3 + 1 + 4 + 1)·a·d·T and of the
  fused attention (a·d·T + 4·h·T) = r·d·T + 10·a·d·T + 4·h·T (11·d·T + h·T elements in fp32, against
  16·d·T + (4 + h)·T without remat). The fc2 output is kept though backward never needs it (an
  op-level policy cannot tell which matmul ends the block); keeping it is d·T per block.

Other models (`MeasuredSpec`): one small forward per policy under `SavedTensorMeter` at batch 1 and
2; bytes are taken as linear in the batch, fixed = 2·m(1) − m(2), per_sample = m(2) − m(1), plus
a cross-entropy loss (log-softmax of the output in fp32 and an int64 target per sample). The
working set is (none − policy) per sample over the number of wrapped blocks, plus the output and
its gradient (2 × output, fp32).

The largest micro-batch is the largest b with state + peak activations(b) ≤ usable_fraction ×
device memory (0.9 by default: CUDA context, allocator caching and fragmentation take the rest).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from torch import nn

from bigbatch.memory.activation import measure_saved_bytes
from bigbatch.optim.registry import optimizer_spec
from bigbatch.memory.remat import POLICIES, apply_remat, check_policy, wrapped_indices

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
PRECISIONS = ("fp32", "bf16")
FP32, INT64 = 4, 8  # bytes per element

def optimizer_state_bytes(name: str, momentum: float = 0.9) -> int:
    """Bytes of optimizer state per parameter (fp32), as each optimizer's registration declares."""
    return optimizer_spec(name).state_bytes_per_param(momentum)


def model_optimizer_bytes(spec: "ModelSpec", name: str, momentum: float = 0.9) -> int:
    """Optimizer state of the whole model: per-parameter bytes × n, except for optimizers whose hidden
    matrices keep other state than the rest (muon: 4 B there, 8 B elsewhere)."""
    opt = optimizer_spec(name)
    total = opt.state_bytes_per_param(momentum) * spec.n_params
    if opt.hidden_matrix_state_bytes is None:
        return total
    hidden = spec.hidden_matrix_params
    return total + (opt.hidden_matrix_state_bytes - opt.state_bytes_per_param(momentum)) * hidden


def _precision_bytes(precision: str) -> tuple[int, int]:
    """(residual-stream bytes, matmul-operand bytes) under `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: the planner knows {', '.join(PRECISIONS)}, not '{precision}'")
    return (FP32, FP32) if precision == "fp32" else (FP32, 2)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-batch of `b` samples under one remat policy."""

    policy: str
    fixed_bytes: int            # saved, independent of b
    per_sample_bytes: int       # saved, per sample (sequence)
    working_fixed_bytes: int = 0
    working_per_sample_bytes: int = 0

    def saved(self, batch: int) -> int:
        """Bytes saved for backward at the end of the forward (what SavedTensorMeter counts)."""
        return self.fixed_bytes + batch * self.per_sample_bytes

    def peak(self, batch: int) -> int:
        """Saved bytes plus the backward working set (recomputed block, output and its gradient)."""
        return self.saved(batch) + self.working_fixed_bytes + batch * self.working_per_sample_bytes


class ModelSpec(Protocol):
    """What the planner needs to know about a model."""

    name: str
    policies: tuple[str, ...]              # the remat policies that apply to it

    @property
    def n_params(self) -> int: ...

    @property
    def root_params(self) -> int: ...      # parameters outside `blocks`

    @property
    def max_block_params(self) -> int: ...

    @property
    def hidden_matrix_params(self) -> int: ...  # what Muon orthogonalizes (bigbatch.optim.muon)

    def activations(self, policy: str, k: int, precision: str) -> ActivationEstimate: ...


@dataclass(frozen=True)
class GPTSpec:
    """`bigbatch.models.gpt.GPT` by its sizes; activations from the closed form in the module doc."""

    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    block_size: Optional[int] = None  # rows of the position table (default seq_len)
    dropout: float = 0.0
    attention: str = "fused"          # fused (out + logsumexp) | math (T×T probabilities)
    name: str = "gpt"
    policies: tuple[str, ...] = POLICIES

    def __post_init__(self) -> None:
        if self.attention not in ("fused", "math"):
            raise ValueError(f"attention: fused or math, not '{self.attention}'")

    @property
    def block_params(self) -> int:
        d = self.d_model  # ln1, ln2: 2d each; qkv 3d²+3d; proj d²+d; fc1 4d²+4d; fc2 4d²+d
        return 12 * d * d + 13 * d

    @property
    def root_params(self) -> int:
        # Tied embeddings: the token table is also the head, counted once (the 2·d·V is untied).
        return (self.vocab_size + (self.block_size or self.seq_len) + 2) * self.d_model

    @property
    def max_block_params(self) -> int:
        return self.block_params

    @property
    def hidden_matrix_params(self) -> int:
        return self.n_layer * 12 * self.d_model ** 2  # qkv, proj, fc1, fc2; embeddings/head are AdamW's

    @property
    def n_params(self) -> int:
        return self.n_layer * self.block_params + self.root_params

    def block_bytes(self, mode: str, precision: str) -> int:
        """Bytes one block saves per sequence: mode none, full or selective (module doc table)."""
        r, a = _precision_bytes(precision)
        d, t, h = self.d_model, self.seq_len, self.n_head
        dropout = self.dropout > 0
        if mode == "full":
            return r * d * t
        if self.attention == "fused":
            attention = 3 * a * d * t + a * d * t + FP32 * h * t  # q,k,v + output + logsumexp
            kept_attention = a * d * t + FP32 * h * t               # fused kernel's outputs
        else:  # the math path computes in fp32 even under bf16 autocast (CPU)
            attention = 3 * FP32 * d * t + a * d * t + (3 if dropout else 1) * FP32 * h * t * t
            kept_attention = FP32 * (h * t * t + d * t)             # the two bmm outputs
        if mode == "selective":
            return r * d * t + 9 * a * d * t + kept_attention
        layer_norms = 2 * (r * d * t + 2 * FP32 * t)
        mlp = a * d * t + 8 * a * d * t + (a * d * t if dropout else 0)
        return layer_norms + a * d * t + attention + mlp

    def activations(self, policy: str, k: int = 2, precision: str = "fp32") -> ActivationEstimate:
        check_policy(policy, k)
        r, a = _precision_bytes(precision)
        d, t, v = self.d_model, self.seq_len, self.vocab_size
        wrapped = len(wrapped_indices(self.n_layer, policy, k))
        mode = "selective" if policy == "selective" else "full"
        blocks = (self.n_layer - wrapped) * self.block_bytes("none", precision) \
            + wrapped * self.block_bytes(mode, precision)
        embedding = INT64 * t + (r * d * t if self.dropout > 0 else 0)
        head = r * d * t + 2 * FP32 * t + a * d * t
        loss = FP32 * v * t + INT64 * t
        casts = 0 if a == FP32 else a * (v * d + 12 * d * d * (self.n_layer - wrapped))
        working = 0
        if wrapped:
            working = self.block_bytes("none", precision) - self.block_bytes(mode, precision)
        return ActivationEstimate(
            policy, fixed_bytes=INT64 * t + FP32 + casts,
            per_sample_bytes=embedding + blocks + head + loss,
            working_fixed_bytes=(a * 12 * d * d if wrapped and a != FP32 else 0),
            working_per_sample_bytes=working + 2 * FP32 * v * t)


@dataclass
class MeasuredSpec:
    """Any model: activations measured by SavedTensorMeter at batch 1 and 2, under every remat
    policy if it has `blocks` (an nn.ModuleList), else under `none` only.

    `inputs` is one input batch with at least 2 samples (first dimension). Measures a deep copy in
    training mode; `model` itself is not changed. The loss is taken to be cross-entropy over the
    output: its log-softmax (fp32, the output's size) and int64 targets are added per sample.
    """

    model: nn.Module
    inputs: torch.Tensor
    name: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.shape[0] < 2:
            raise ValueError("MeasuredSpec: inputs needs at least 2 samples to fit bytes = a + b·batch")
        self.name = self.name or type(self.model).__name__.lower()

    @property
    def policies(self) -> tuple[str, ...]:
        has_blocks = isinstance(getattr(self.model, "blocks", None), nn.ModuleList)
        return POLICIES if has_blocks else ("none",)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def root_params(self) -> int:
        return self.n_params - sum(self._block_params())

    @property
    def max_block_params(self) -> int:
        return max(self._block_params(), default=0)

    @property
    def hidden_matrix_params(self) -> int:
        from bigbatch.optim.muon import hidden_matrix_params

        return hidden_matrix_params(self.model)

    def _block_params(self) -> list[int]:
        blocks = getattr(self.model, "blocks", [])
        return [sum(p.numel() for p in block.parameters()) for block in blocks]

    def _measure(self, policy: str, k: int, precision: str) -> tuple[int, int, int]:
        """(saved bytes at batch 1, at batch 2, output elements per sample)."""
        key = (policy, k, precision)
        if key not in self._cache:
            model = apply_remat(copy.deepcopy(self.model).train(), policy, k)
            device = next(model.parameters()).device.type
            with torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
                # Cloned: a slice would keep (and count) the storage of the whole input batch.
                m1, m2 = (measure_saved_bytes(model, self.inputs[:b].clone()) for b in (1, 2))
                with torch.no_grad():
                    out = model(self.inputs[:1])
            self._cache[key] = (m1, m2, out.numel())
        return self._cache[key]

    def activations(self, policy: str, k: int = 2, precision: str = "fp32") -> ActivationEstimate:
        check_policy(policy, k)
        _precision_bytes(precision)
        m1, m2, out_elems = self._measure(policy, k, precision)
        wrapped = len(wrapped_indices(len(self._block_params()), policy, k))
        working = 0
        if wrapped:
            n1, n2, _ = self._measure("none", k, precision)
            working = max(0, ((n2 - n1) - (m2 - m1)) // wrapped)
        loss = FP32 * out_elems + INT64  # cross-entropy's log-softmax and target
        return ActivationEstimate(policy, fixed_bytes=max(0, 2 * m1 - m2),
                                  per_sample_bytes=m2 - m1 + loss,
                                  working_per_sample_bytes=working + 2 * FP32 * out_elems)


def spec_from_model(model: nn.Module, inputs: torch.Tensor) -> ModelSpec:
    """A GPTSpec for `bigbatch.models.gpt.GPT` (sizes read off the module), else a MeasuredSpec."""
    from bigbatch.models.gpt import GPT

    if not isinstance(model, GPT):
        return MeasuredSpec(model, inputs)
    attn = model.blocks[0].attn
    dropout = attn.dropout
    on_cpu = model.tok.weight.device.type == "cpu"  # CPU SDPA falls back to math with dropout
    return GPTSpec(n_layer=len(model.blocks), d_model=model.tok.embedding_dim, n_head=attn.n_head,
                   vocab_size=model.tok.num_embeddings, seq_len=inputs.shape[1],
                   block_size=model.pos.num_embeddings, dropout=dropout,
                   attention="math" if dropout > 0 and on_cpu else "fused")


@dataclass(frozen=True)
class RankState:
    """Bytes of model state one rank holds under `strategy` (the table in the module doc)."""

    strategy: str
    params: int
    grads: int
    optimizer: int
    comm_buffers: int
    average: int = 0  # the ema: weight average (float32), bigbatch.optim.averaging

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.comm_buffers + self.average


def rank_state(strategy: str, spec: ModelSpec, world_size: int, state_bytes_per_param: int,
               ddp_bucket_view: bool = True, optimizer_bytes: Optional[int] = None,
               weight_average: bool = False) -> RankState:
    """`optimizer_bytes`: the whole model's optimizer state (default state_bytes_per_param × n).
    `weight_average`: an ema: average is kept, float32 like the parameters it averages (whole tensors
    under ddp/zero1, this rank's shards under zero2/zero3)."""
    n = spec.n_params
    shard = lambda nbytes: -(-nbytes // world_size)  # noqa: E731 (ceil division)
    opt = state_bytes_per_param * n if optimizer_bytes is None else optimizer_bytes
    params, grads = FP32 * n, FP32 * n
    average = FP32 * n if weight_average else 0
    buckets = 0 if ddp_bucket_view else FP32 * n
    if strategy == "ddp":
        return RankState(strategy, params, grads, opt, buckets, average)
    if strategy == "zero1":
        return RankState(strategy, params, grads, shard(opt), buckets, average)
    if strategy == "zero2":
        return RankState(strategy, params, shard(grads), shard(opt), 0, shard(average))
    if strategy == "zero3":
        gathered = FP32 * (spec.root_params + 2 * spec.max_block_params)
        return RankState(strategy, shard(params), shard(grads), shard(opt), gathered, shard(average))
    raise ValueError(f"distributed.strategy: the planner models {', '.join(STRATEGIES)}, not '{strategy}'")


def largest_micro_batch(state: RankState, act: ActivationEstimate, usable_bytes: int) -> int:
    """The largest b with state + peak activations(b) ≤ usable bytes; 0 when not even b=1 fits."""
    room = usable_bytes - state.total - act.peak(0)
    per_sample = act.peak(1) - act.peak(0)
    if room < per_sample:
        return 0
    return room // per_sample if per_sample else 2**31


@dataclass(frozen=True)
class Selection:
    """The configured strategy, policy and micro-batch, checked against the device."""

    strategy: str
    policy: str
    micro_batch: Optional[int]
    largest: int
    peak_bytes: Optional[int]  # state + peak activations at micro_batch


@dataclass(frozen=True)
class PlanReport:
    model: str
    n_params: int
    world_size: int
    device_memory_bytes: int
    usable_bytes: int
    optimizer: str
    state_bytes_per_param: int
    precision: str
    k: int
    states: list[RankState]
    activations: list[ActivationEstimate]
    max_micro_batch: dict[str, dict[str, int]]  # strategy -> policy -> largest micro-batch
    selection: Optional[Selection] = None


def plan(spec: ModelSpec, world_size: int, device_memory_bytes: int, *, optimizer: str = "adamw",
         momentum: float = 0.9, precision: str = "fp32", k: int = 2,
         strategy: Optional[str] = None, policy: Optional[str] = None,
         micro_batch: Optional[int] = None, usable_fraction: float = 0.9,
         ddp_bucket_view: bool = True, weight_average: bool = False) -> PlanReport:
    """Per-rank memory of every strategy × remat policy, and the largest micro-batch of each.

    `strategy`/`policy`/`micro_batch`, if given, are the configured choice, reported in `selection`;
    `weight_average`: the run keeps an ema: average (counted in every strategy's state).
    """
    if world_size < 1:
        raise ValueError(f"world size: must be at least 1, got {world_size}")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction: must be in (0, 1], got {usable_fraction}")
    per_param = optimizer_state_bytes(optimizer, momentum)
    opt_bytes = model_optimizer_bytes(spec, optimizer, momentum)
    usable = int(device_memory_bytes * usable_fraction)
    states = [rank_state(s, spec, world_size, per_param, ddp_bucket_view, opt_bytes, weight_average)
              for s in STRATEGIES]
    acts = [spec.activations(p, k, precision) for p in spec.policies]
    grid = {st.strategy: {a.policy: largest_micro_batch(st, a, usable) for a in acts} for st in states}
    selection = None
    if strategy is not None or policy is not None:
        strategy, policy = strategy or "ddp", policy or "none"
        state = rank_state(strategy, spec, world_size, per_param, ddp_bucket_view, opt_bytes, weight_average)
        act = spec.activations(policy, k, precision)
        peak = None if micro_batch is None else state.total + act.peak(micro_batch)
        selection = Selection(strategy, policy, micro_batch, largest_micro_batch(state, act, usable), peak)
    return PlanReport(spec.name, spec.n_params, world_size, device_memory_bytes, usable, optimizer,
                      per_param, precision, k, states, acts, grid, selection)


def format_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _state_bytes_text(report: PlanReport) -> str:
    matrix = optimizer_spec(report.optimizer).hidden_matrix_state_bytes
    if matrix is None:
        return f"{report.state_bytes_per_param} B/param"
    return f"{matrix} B/param in hidden matrices, {report.state_bytes_per_param} B/param elsewhere"


def format_plan(report: PlanReport) -> str:
    """The report as text: model state per strategy, activations per policy, micro-batch grid."""
    out = [f"model {report.model}: {report.n_params:,} parameters, {report.precision}, "
           f"optimizer {report.optimizer} ({_state_bytes_text(report)}), "
           f"{report.world_size} ranks",
           f"device memory {format_bytes(report.device_memory_bytes)}, usable "
           f"{format_bytes(report.usable_bytes)}", "", "per-rank model state:"]
    average = any(s.average for s in report.states)  # the column only when an ema: average is kept
    column = lambda s: [s.average] if average else []  # noqa: E731
    out += _table(["strategy", "params", "grads", "optimizer", "comm buffers",
                   *(["weight average"] if average else []), "total"],
                  [[s.strategy, *map(format_bytes, (s.params, s.grads, s.optimizer, s.comm_buffers,
                                                     *column(s), s.total))] for s in report.states])
    out += ["", f"activations per micro-batch (k={report.k} for every_k):"]
    out += _table(["remat", "saved fixed", "saved/sample", "peak fixed", "peak/sample"],
                  [[a.policy, *map(format_bytes, (a.saved(0), a.saved(1) - a.saved(0),
                                                   a.peak(0), a.peak(1) - a.peak(0)))]
                   for a in report.activations])
    policies = [a.policy for a in report.activations]
    out += ["", "largest micro-batch per rank (0: does not fit):"]
    out += _table(["strategy", *policies],
                  [[s, *(str(report.max_micro_batch[s][p]) for p in policies)]
                   for s in report.max_micro_batch])
    sel = report.selection
    if sel is not None:
        line = f"configured {sel.strategy} + remat {sel.policy}: largest micro-batch {sel.largest}"
        if sel.micro_batch is not None:
            verdict = "fits" if sel.micro_batch <= sel.largest else "does NOT fit"
            line += (f"; micro-batch {sel.micro_batch} {verdict} "
                     f"(peak {format_bytes(sel.peak_bytes)} of {format_bytes(report.usable_bytes)})")
        out += ["", line]
    return "\n".join(out)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' → 80·10⁹, '80GiB' → 80·2³⁰, '1024' → 1024 (SI and binary units, case-insensitive)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(f"device memory: cannot read '{text}'; write e.g. 80GB, 80GiB or 85899345920")
    return int(float(match.group(1)) * _UNITS[unit])
