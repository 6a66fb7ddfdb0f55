"""All-reduce latency and bandwidth over the current process group (nccl-tests conventions).

For a message of S bytes taking t seconds: algbw = S / t, and busbw = algbw * 2(N-1)/N, the rate
each link must carry in a ring all-reduce; busbw is comparable across world sizes and to the link's
nominal speed. Times are per-rank means over `iters` calls after `warmup`, and the slowest rank's
mean is reported (every rank returns the same rows).
"""

from __future__ import annotations

import re
import time

import torch
import torch.distributed as dist

from bigbatch.comm import Communicator

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in "16M", "64K", "1G", "1.5M", "4096" (K/M/G are powers of 2^10; "MB"/"MiB" accepted)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read size {text!r}; write e.g. 4096, 64K, 16M or 1G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _timed(comm: Communicator, tensor: torch.Tensor, iters: int) -> float:
    """Mean seconds of one all-reduce on this rank."""
    comm.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(tensor, "bench", op="sum")
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return (time.perf_counter() - start) / iters


def run_allreduce_bench(sizes_bytes: list[int], iters: int = 20, warmup: int = 5,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32,
                        comm: Communicator | None = None) -> list[dict]:
    """One row per size: bytes, world_size, mean latency (s), algbw and busbw (GB/s, 1e9 B/s)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    comm = comm or Communicator()
    device = torch.device(device) if device is not None else _default_device()
    world = comm.size
    element_size = torch.empty((), dtype=dtype).element_size()
    rows = []
    for size in sizes_bytes:
        tensor = torch.ones(max(1, size // element_size), dtype=dtype, device=device)
        nbytes = tensor.numel() * element_size
        for _ in range(warmup):
            comm.all_reduce(tensor, "bench", op="sum")
        latency = torch.tensor([_timed(comm, tensor, iters)], dtype=torch.float64)
        comm.all_reduce(latency, "bench_meta", op="max")  # the slowest rank sets the pace
        seconds = float(latency)
        algbw = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
        rows.append({"bytes": nbytes, "world_size": world, "latency_s": seconds,
                     "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (world - 1) / world})
    return rows


def _human(nbytes: int) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (size, latency in µs, algbw and busbw in GB/s)."""
    header = ("size", "bytes", "ranks", "latency_us", "algbw_GB/s", "busbw_GB/s")
    lines = [(_human(r["bytes"]), str(r["bytes"]), str(r["world_size"]), f"{r['latency_s'] * 1e6:.1f}",
              f"{r['algbw_GBps']:.3f}", f"{r['busbw_GBps']:.3f}") for r in rows]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths))
                     for cells in [header] + lines)
