"""Process-group setup and teardown for one rank: backend, device, CPU threads."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from bigbatch.config import DistributedConfig
from bigbatch.launch.env import DistEnv, cpu_share, detect, export_env, user_threads


@dataclass(frozen=True)
class Runtime:
    """This rank's place in the job; `is_main` ranks write files and print."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("distributed.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    return requested


def set_cpu_threads(info: DistEnv) -> None:
    """Share the cores between the ranks on this node, under any launcher. A user's OMP_NUM_THREADS
    wins; the one `bigbatch launch` sets does not (env.OMP_FROM_USER). Plain torchrun sets 1, which
    cannot be told from a user's: export your own there."""
    torch.set_num_threads(user_threads() or cpu_share(info.local_world_size))


@contextlib.contextmanager
def distributed_runtime(cfg: DistributedConfig) -> Iterator[Runtime]:
    """Initialise the process group (if more than one rank) and always destroy it on the way out."""
    info = detect()
    backend = pick_backend(cfg.backend)
    set_cpu_threads(info)
    device = torch.device("cpu")
    if backend == "nccl":
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {info.local_rank} has no GPU: this node shows "
                             f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one rank per "
                             "GPU (slurm.gpus_per_node, --nproc-per-node) and do not bind GPUs per task")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.world_size > 1:
        export_env(info)
        dist.init_process_group(backend, init_method="env://", rank=info.rank,
                                world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=cfg.timeout_s))
    try:
        yield Runtime(info.rank, info.world_size, info.local_rank, device,
                      backend if info.world_size > 1 else None)
    finally:
        # The trainer's reference cycles keep DDP's reducer and gloo's pending work alive; freed at
        # interpreter shutdown they abort the process ("terminate called without an active exception").
        # Collect them now, while the interpreter and the process group still exist.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
