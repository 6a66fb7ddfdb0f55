"""PowerSGD: rank-r gradient compression with error feedback (Vogels et al., NeurIPS 2019).

Each matrix-shaped gradient M (n x m; a >2-D tensor is viewed as (shape[0], -1)) is replaced, on
every rank, by the same rank-r approximation of the average of the ranks' M:

    M += error                       error feedback: what earlier steps failed to send
    P  = M Q                         Q: m x r, the same on every rank (warm: last step's Q)
    P  = all_reduce_sum(P)           kind powersgd_p   (n*r elements)
    P  = orthogonalize(P)            the sum's scale does not matter, so no division
    Q  = M^T P
    Q  = all_reduce_sum(Q) / N       kind powersgd_q   (m*r elements); now Q = mean(M)^T P
    M' = P Q^T                       = P P^T mean(M): mean(M) projected on span(P)
    error = M - M'                   per rank, kept for the next step

Tuning guide
------------
- `rank` sets the compression: a gradient shrinks from n*m to (n+m)*r elements. r=1..4 is typical;
  raise it when the loss lags the uncompressed run.
- `target_ratio` (compression.target_ratio; `fit_rank`): instead of a rank, how many times fewer
  bytes than the float32 all-reduce a compressed step must send; the largest rank (one for every
  matrix) that meets it is chosen from the model's shapes. With `factor_bits: 8` a ratio of 100 gives
  rank 13 on the demo (102.8x; rank 2 in float32, 157x, costs the demo 4 points of accuracy).
- `start_step`: plain all-reduce (`grad_allreduce`) for steps < start_step. Early training is the
  most sensitive to biased gradients; a few hundred plain steps often recover full accuracy.
- `min_compression_rate`: a tensor is compressed only if n*m / ((n+m)*r) >= this rate. The rest
  (and every 1-D tensor: biases, norms) is averaged exactly in one flat all-reduce per call (kind
  `powersgd_uncompressed`), started first so it overlaps the compression work.
- `error_feedback`: keep on. PowerSGD is biased; the residual carried to the next step makes the sum
  of applied updates track the sum of true gradients. Costs one gradient-sized buffer per rank.
- `warm_start`: keep on. Reusing last step's Q makes each step one more power iteration, so the
  approximation improves over steps on slowly-changing gradients. Costs the Q matrices.
- `orthogonalization`: `gram_schmidt` (default, fine for small r, works in half precision) or `qr`
  (LAPACK/cuSOLVER; usually faster for r > 4; half precision falls back to Gram-Schmidt).
- `factor_bits`: 8 or 4 sends P and Q as int8/int4 codes with a float32 scale per 64 elements of a
  column (compression.quantize; all-gathered, dequantized and averaged in rank order), so rank 8 at
  8 bits costs about what rank 2 costs in float32. Error feedback absorbs the rounding (the residual
  is taken against the P and Q every rank received). 0 (default): float32 all-reduces.
- `seed`: initial Q matrices. Every Q draw comes from a `torch.Generator` seeded by a hash of
  (seed, parameter name, how many Qs that name drew before), so every rank draws the same Q, and the
  draw does not depend on the order or grouping (DDP buckets) in which parameters arrive.

Communication per call: one P and one Q all-reduce for all compressed tensors (per device and dtype),
plus one for the uncompressed rest. Called once per DDP bucket (`ddp_hook`), that is per bucket.

State (`state_dict`): `step`, `rank`, `seed`, and per parameter NAME: `errors` (this rank's
residual), `q_t` (the warm Q, stored transposed as (r, m)) and `draws` (Q draws so far). It restores
exactly, bit for bit, whatever the bucket layout of the resumed run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bigbatch.compression.base import (Compressor, NamedGrads, all_reduce_flat,
                                       all_reduce_flat_async, payload_bytes)
from bigbatch.compression.quantize import LEVELS, all_gather_mean, quantize, quantized_bytes
from bigbatch.comm import Communicator

ORTHOGONALIZATIONS = ("gram_schmidt", "qr")
BLOCK = 64  # factor_bits: elements of a factor's column per float32 scale


def q_seed(seed: int, name: str, draw: int) -> int:
    """The generator seed of the `draw`-th Q of parameter `name` (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}:{name}:{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def float32_bytes(shapes: list[tuple[int, ...]]) -> int:
    """What a plain float32 all-reduce of gradients of `shapes` sends: the measure of target_ratio."""
    return 4 * sum(math.prod(shape) for shape in shapes)


def gram_schmidt_(matrices: Tensor) -> Tensor:
    """Orthonormalize the columns of each matrix of a (B, n, r) batch in place (modified
    Gram-Schmidt; a zero column stays zero instead of becoming NaN)."""
    tiny = torch.finfo(matrices.dtype).tiny
    for i in range(matrices.shape[2]):
        col = matrices[:, :, i:i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True).clamp_min_(tiny))
        if i + 1 < matrices.shape[2]:
            rest = matrices[:, :, i + 1:]
            rest.sub_((col * rest).sum(dim=1, keepdim=True) * col)
    return matrices


def orthogonalize_(matrices: Tensor, method: str) -> Tensor:
    """Orthonormalize a (B, n, r) batch of column blocks in place."""
    if method == "qr" and matrices.dtype not in (torch.float16, torch.bfloat16):
        matrices.copy_(torch.linalg.qr(matrices).Q)
        return matrices
    return gram_schmidt_(matrices)


@dataclass
class _Matrix:
    """One gradient being compressed this call."""

    name: str
    grad: Tensor  # the caller's tensor; receives the approximation
    mat: Tensor  # (n, m) contiguous working view (of grad, or of a contiguous copy)
    r: int


class PowerSGD(Compressor):
    """Rank-`rank` PowerSGD with error feedback and warm start; see the module docstring."""

    def __init__(self, rank: int = 2, start_step: int = 10, min_compression_rate: float = 2.0,
                 error_feedback: bool = True, warm_start: bool = True,
                 orthogonalization: str = "gram_schmidt", seed: int = 0, factor_bits: int = 0):
        super().__init__()
        problems = []
        if not (isinstance(rank, int) and rank >= 1):
            problems.append(f"rank must be an integer >= 1, got {rank!r}")
        if start_step < 0:
            problems.append(f"start_step must be >= 0, got {start_step}")
        if not min_compression_rate > 0:
            problems.append(f"min_compression_rate must be > 0, got {min_compression_rate}")
        if orthogonalization not in ORTHOGONALIZATIONS:
            problems.append(f"orthogonalization must be one of {ORTHOGONALIZATIONS}, "
                            f"got {orthogonalization!r}")
        if factor_bits not in (0, *LEVELS):
            problems.append(f"factor_bits must be 0 (float), 8 or 4, got {factor_bits!r}")
        if problems:
            raise ValueError("PowerSGD: " + "; ".join(problems))
        self.rank, self.start_step = rank, start_step
        self.min_compression_rate = min_compression_rate
        self.error_feedback, self.warm_start = error_feedback, warm_start
        self.orthogonalization, self.seed = orthogonalization, seed
        self.factor_bits = factor_bits
        self._errors: dict[str, Tensor] = {}  # name -> residual, shaped like the gradient
        # name -> Q^T, (r, m) and contiguous, of the last step (warm start). One fixed layout, so
        # a resumed run takes the very same BLAS path and reproduces the bits.
        self._q_ts: dict[str, Tensor] = {}
        self._draws: dict[str, int] = {}  # name -> Q draws so far

    # -- what gets compressed ------------------------------------------------------------------
    def compressed_rank(self, shape: torch.Size | tuple[int, ...], rank: int | None = None) -> int:
        """The approximation rank used for a gradient of `shape` (at `rank`, default this
        compressor's), or 0 if it is sent uncompressed."""
        if len(shape) < 2:
            return 0
        n, m = shape[0], math.prod(shape[1:])
        r = min(n, m, self.rank if rank is None else rank)
        if r == 0 or 4 * n * m < self.min_compression_rate * self.factor_bytes(n, m, r):
            return 0
        return r

    def factor_bytes(self, n: int, m: int, r: int) -> int:
        """Bytes this rank sends for P (n x r) and Q (m x r): float32, or codes plus scales."""
        if not self.factor_bits:
            return 4 * (n + m) * r
        return quantized_bytes((r, n), self.factor_bits, BLOCK) + quantized_bytes((r, m), self.factor_bits, BLOCK)

    def step_bytes(self, shapes: list[tuple[int, ...]], rank: int | None = None) -> int:
        """Bytes one rank sends in a compressed step for float32 gradients of `shapes`."""
        total = 0
        for shape in shapes:
            r = self.compressed_rank(shape, rank)
            total += self.factor_bytes(shape[0], math.prod(shape[1:]), r) if r else 4 * math.prod(shape)
        return total

    def fit_rank(self, shapes: list[tuple[int, ...]], target_ratio: float) -> int:
        """Set `rank` to the largest one rank that makes a compressed step send at least
        `target_ratio` times fewer bytes than a float32 all-reduce of gradients of `shapes`, and
        return it (compression.target_ratio). Raises ValueError if rank 1 sends too much already."""
        shapes = [tuple(s) for s in shapes]
        budget = float32_bytes(shapes) / target_ratio
        largest = max((min(s[0], math.prod(s[1:])) for s in shapes if len(s) > 1), default=0)
        fitted = 0
        while fitted < largest and self.step_bytes(shapes, fitted + 1) <= budget:
            fitted += 1
        if fitted == 0:
            raise ValueError(self._out_of_reach(shapes, target_ratio, budget))
        self.rank = fitted
        return fitted

    def _out_of_reach(self, shapes: list[tuple[int, ...]], target_ratio: float, budget: float) -> str:
        best = float32_bytes(shapes) / max(self.step_bytes(shapes, 1), 1)
        plain = float32_bytes([s for s in shapes if self.compressed_rank(s, 1) == 0])
        quantized = PowerSGD(min_compression_rate=self.min_compression_rate, factor_bits=8)
        hint = " or factor_bits: 8" if not self.factor_bits and quantized.step_bytes(shapes, 1) <= budget else ""
        return (f"compression.target_ratio: {target_ratio:g} is out of reach for this model: rank 1 sends "
                f"{best:.1f}x fewer bytes than the all-reduce ({plain:,} B of it in tensors sent plain: "
                f"biases, norms and small matrices); set target_ratio <= {math.floor(best * 10) / 10:g}{hint}")

    # -- the algorithm -------------------------------------------------------------------------
    def reduce(self, named_grads: NamedGrads, comm: Communicator) -> None:
        comm.add_uncompressed(payload_bytes([g for _, g in named_grads]))
        if self.step < self.start_step:
            all_reduce_flat([g for _, g in named_grads], comm, "grad_allreduce")
            return
        plain, matrices = [], []
        for name, grad in named_grads:
            r = self.compressed_rank(grad.shape)
            if r == 0:
                plain.append(grad)
            else:
                mat = grad if grad.is_contiguous() else grad.contiguous()
                matrices.append(_Matrix(name, grad, mat.view(grad.shape[0], -1), r))
        # Start the exact all-reduce of the small tensors first; it overlaps the work below.
        pending = all_reduce_flat_async(plain, comm, "powersgd_uncompressed")
        by_dtype: dict[tuple, list[_Matrix]] = {}
        for item in matrices:
            by_dtype.setdefault((item.mat.device, item.mat.dtype), []).append(item)
        for group in by_dtype.values():
            self._compress(group, comm)
        pending.wait()

    def _compress(self, items: list[_Matrix], comm: Communicator) -> None:
        # Every matrix product reads tensors of their own allocation, never views at an offset into a
        # DDP bucket or a flat buffer: CPU BLAS rounds differently with its operands' alignment, and a
        # bucket's layout differs between a run's first step and later ones (DDP rebuilds it), so a
        # resumed run would not reproduce the bits otherwise (the rank-2 kill-and-resume test).
        # With error feedback the residual buffer (allocated once per parameter) becomes M + error in
        # place and then, after the products, the new residual: no extra gradient-sized buffer.
        if self.error_feedback:
            works = [self._state_tensor(self._errors, item.name, item.grad, zeros=True).view_as(item.mat)
                     for item in items]
            torch._foreach_add_(works, [item.mat for item in items])
        else:
            works = [item.mat.clone() for item in items]
        ps = [torch.mm(work, self._initial_q_t(item).t()) for work, item in zip(works, items)]
        self._reduce_factors([p.t() for p in ps], comm, "powersgd_p")
        self._orthogonalize(ps)

        # Q is computed and sent transposed, (r, m) = P^T M: BLAS reads row-major M faster this way
        # than as M^T P (2x on CPU); the all-reduce does not care about the layout.
        qts = [torch.mm(p.t(), work) for p, work in zip(ps, works)]
        self._reduce_factors(qts, comm, "powersgd_q", average=True)

        # The approximation and the residual are each one pass over M (memory-bound on CPU and GPU):
        # M = P Q^T into the gradient, then error = (M + error) - P Q^T as one fused in-place addmm.
        for work, p, qt, item in zip(works, ps, qts, items):
            torch.mm(p, qt, out=item.mat)
            if self.error_feedback:
                work.addmm_(p, qt, alpha=-1)
            if item.mat.data_ptr() != item.grad.data_ptr():  # worked on a contiguous copy
                item.grad.copy_(item.mat.view_as(item.grad))
            if self.warm_start:
                self._q_ts[item.name] = qt

    def _orthogonalize(self, ps: list[Tensor]) -> None:
        """Orthonormalize each P's columns in place, those of one shape as one (B, n, r) batch."""
        by_shape: dict[torch.Size, list[Tensor]] = {}
        for p in ps:
            by_shape.setdefault(p.shape, []).append(p)
        for same in by_shape.values():
            batch = orthogonalize_(torch.stack(same), self.orthogonalization)
            for p, done in zip(same, batch):
                p.copy_(done)

    def _reduce_factors(self, factors_t: list[Tensor], comm: Communicator, kind: str,
                        average: bool = False) -> None:
        """All-reduce every rank's factors, each given transposed (r x rows), in place: the sum, or
        the mean if `average`. Quantized, each factor is sent column by column (a column's blocks
        share scales: the columns' magnitudes differ by the singular values) and the mean comes
        back; P's sum only feeds an orthogonalization, so its mean serves as well."""
        columns = [f.contiguous() for f in factors_t]
        if self.factor_bits:
            quantized = [quantize(c, self.factor_bits, BLOCK) for c in columns]
            reduced = all_gather_mean(quantized, [c.shape for c in columns], self.factor_bits, BLOCK, comm, kind)
        else:
            flat = torch.cat([c.view(-1) for c in columns])
            comm.all_reduce(flat, kind, op="avg" if average else "sum")
            reduced = flat.split([c.numel() for c in columns])
        for factor_t, value in zip(factors_t, reduced):
            factor_t.copy_(value.view_as(factor_t))

    def _initial_q_t(self, item: _Matrix) -> Tensor:
        """Q^T (r, m) to start from: last step's if warm, else a fresh draw of Q ~ N(0, 1)^(m x r)."""
        m = item.mat.shape[1]
        if self.warm_start and item.name in self._q_ts:
            q_t = self._state_tensor(self._q_ts, item.name, item.mat)
            if q_t.shape != (item.r, m):
                raise ValueError(f"PowerSGD: stored Q^T of {item.name!r} has shape "
                                 f"{tuple(q_t.shape)}, expected {(item.r, m)}")
            return q_t
        draw = self._draws.get(item.name, 0)
        self._draws[item.name] = draw + 1
        generator = torch.Generator().manual_seed(q_seed(self.seed, item.name, draw))
        q = torch.randn(m, item.r, generator=generator)
        return q.t().contiguous().to(device=item.mat.device, dtype=item.mat.dtype)

    @staticmethod
    def _state_tensor(table: dict[str, Tensor], name: str, like: Tensor, zeros: bool = False) -> Tensor:
        """table[name] on `like`'s device and dtype (moved once, e.g. after loading a checkpoint)."""
        t = table.get(name)
        if t is None and zeros:
            t = table[name] = torch.zeros(like.shape, device=like.device, dtype=like.dtype)
        elif t.device != like.device or t.dtype != like.dtype:
            t = table[name] = t.to(device=like.device, dtype=like.dtype)
        if zeros and t.shape != like.shape:
            raise ValueError(f"PowerSGD: stored residual of {name!r} has shape {tuple(t.shape)}, "
                             f"the gradient {tuple(like.shape)}")
        return t

    # -- state ---------------------------------------------------------------------------------
    def residual(self, name: str) -> Tensor | None:
        """This rank's error-feedback residual of parameter `name` (None before its first use)."""
        return self._errors.get(name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rank": self.rank,
            "seed": self.seed,
            "errors": {name: t.detach().clone() for name, t in self._errors.items()},
            "q_t": {name: t.detach().clone() for name, t in self._q_ts.items()},
            "draws": dict(self._draws),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("rank", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"PowerSGD: checkpoint has {key}={state[key]}, this compressor "
                                 f"{key}={getattr(self, key)}; set compression.{key} to match"
                                 + (" (or the target_ratio that chose it)" if key == "rank" else ""))
        super().load_state_dict(state)
        contiguous = torch.contiguous_format  # the compute views them as matrices
        self._errors = {name: t.clone(memory_format=contiguous) for name, t in state["errors"].items()}
        self._q_ts = {name: t.clone(memory_format=contiguous) for name, t in state["q_t"].items()}
        self._draws = {name: int(n) for name, n in state["draws"].items()}
