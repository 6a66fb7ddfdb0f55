"""PyTorch's own PowerSGD DDP hook, as a baseline for ours, with its traffic counted.

Uses `torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.powerSGD_hook` (the per-tensor hook;
`batched_powerSGD_hook` compresses the whole bucket as one matrix and is broken in torch 2.13).

Accounting. The wrapper does not patch torch.distributed; it counts each bucket's bytes
analytically just before calling torch's hook, from the bucket's gradient shapes and the same rule
torch applies (`_should_compress`: a gradient viewed as (shape[0], -1), r = min(n, m, rank),
compressed iff (n + m) * r * min_compression_rate < n * m, strictly):

- steps < start_step: the whole bucket buffer under `grad_allreduce`;
- after: sum(n * r) under `powersgd_p`, sum(m * r) under `powersgd_q`, and the uncompressed
  gradients under `powersgd_uncompressed` (torch issues that all-reduce even when it is empty).

These are exactly the payloads torch hands to `dist.all_reduce` (same dtype as the bucket). Time is
less precise: torch chains its three all-reduces inside one Future, so the seconds from calling the
hook until that Future completes (compression compute included) are recorded as `grad_allreduce`
before start_step and as `torch_powersgd` (zero bytes) after it.

Differences from `bigbatch.compression.powersgd.PowerSGD` worth knowing when comparing: torch keys its
error and Q buffers by bucket index (not checkpointable across bucket layouts), re-orthogonalizes the
warm Q before computing P, and uses strict `<` in the compression test.
"""

# No `from __future__ import annotations`: DDP checks that the hook's `bucket` annotation
# is the GradBucket class itself, not a string.

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.futures import Future

from bigbatch.comm import Communicator


@dataclass
class TorchPowerSGDHookState:
    powersgd: PowerSGDState
    comm: Communicator | None


def torch_powersgd_bytes(shapes: list[torch.Size], element_size: int, rank: int,
                         min_compression_rate: float) -> dict[str, int]:
    """Bytes torch's powerSGD_hook all-reduces for one bucket once compressing, by kind."""
    counts = {"powersgd_p": 0, "powersgd_q": 0, "powersgd_uncompressed": 0}
    for shape in shapes:
        numel = 1
        for d in shape:
            numel *= d
        n = shape[0] if len(shape) > 0 else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        if len(shape) > 0 and (n + m) * r * min_compression_rate < n * m:
            counts["powersgd_p"] += n * r
            counts["powersgd_q"] += m * r
        else:
            counts["powersgd_uncompressed"] += numel
    return {kind: count * element_size for kind, count in counts.items()}


def counted_powersgd_hook(state: TorchPowerSGDHookState, bucket: GradBucket) -> Future[torch.Tensor]:
    """torch's powerSGD_hook, with its bytes and time recorded in `state.comm`."""
    comm, psgd = state.comm, state.powersgd
    if comm is None:
        return powerSGD_hook(psgd, bucket)
    buffer = bucket.buffer()
    # One rank sends nothing; the Communicator convention is to count zero bytes then.
    nbytes = buffer.numel() * buffer.element_size() if comm.size > 1 else 0
    comm.add_uncompressed(nbytes)
    compressing = psgd.iter >= psgd.start_powerSGD_iter  # read before the hook advances it
    if compressing:
        counts = torch_powersgd_bytes([g.shape for g in bucket.gradients()], buffer.element_size(),
                                      psgd.matrix_approximation_rank, psgd.min_compression_rate)
        for kind, count in counts.items():
            comm.record(kind, count if comm.size > 1 else 0)
    start = time.perf_counter()

    def done(fut: Future) -> torch.Tensor:
        value = fut.value()
        seconds = time.perf_counter() - start
        if compressing:
            comm.record("torch_powersgd", 0, seconds)
        else:
            comm.record("grad_allreduce", nbytes, seconds)
        return value

    return powerSGD_hook(psgd, bucket).then(done)


def register_torch_powersgd(ddp_model: nn.parallel.DistributedDataParallel, rank: int = 2,
                            start_step: int = 10, min_compression_rate: float = 2.0,
                            error_feedback: bool = True, warm_start: bool = True, seed: int = 0,
                            comm: Communicator | None = None) -> TorchPowerSGDHookState:
    """Register torch's PowerSGD hook on `ddp_model` (over `comm`'s group, counted in `comm`).

    torch requires start_step > 1 when error feedback or warm start is on (its buffers are keyed by
    bucket index, and DDP rebuilds buckets after the first iteration).
    """
    group = comm.group if comm is not None else None
    psgd = PowerSGDState(process_group=group, matrix_approximation_rank=rank,
                         start_powerSGD_iter=start_step, min_compression_rate=min_compression_rate,
                         use_error_feedback=error_feedback, warm_start=warm_start, random_seed=seed)
    state = TorchPowerSGDHookState(psgd, comm)
    ddp_model.register_comm_hook(state, counted_powersgd_hook)
    return state
