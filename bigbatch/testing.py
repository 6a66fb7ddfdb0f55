"""Public helpers for tests and benchmarks that run several gloo ranks on one machine.

bigbatch's own tests, `benchmarks/` and users' tests of their own components use them (the README's
Tests section documents them), so they ship with the package instead of living under `tests/`.

`run_ranks(fn, world_size, *args)` starts `world_size` fresh processes, gives each an initialised gloo
process group on 127.0.0.1 and returns what `fn(rank, world_size, *args)` returned on every rank, in
rank order. A rank that raises, dies or outlives `timeout_s` fails the whole call with that rank's
traceback, so a broken collective never hangs the test suite. `free_port()` picks the free TCP port on
127.0.0.1 that `run_ranks` meets on (benchmarks/diloco.py uses it for its own launches).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
               results: Any, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # Pickled by value: torch's queue would share tensors through handles that die with the rank.
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report every failure to the parent, then die
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return the results by rank.

    `fn` must be importable (a module-level function) because ranks are spawned, not forked.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, timeout_s))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout_s)
            outcomes[rank] = (status, value)
            if status == "error":
                break
    except queue.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = [f"rank {r}:\n{v}" for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    missing = sorted(set(range(world_size)) - set(outcomes))
    if missing:
        raise TimeoutError(f"ranks {missing} returned nothing within {timeout_s} s")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
