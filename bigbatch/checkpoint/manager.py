"""When to checkpoint, what goes in, and resuming: the trainer's side of the checkpoint store.

Replicated state (written once, by rank 0): model, optimizer, counters, sampler identity, guard and
any extra Statefuls a strategy registers. Sharded state (zero2/zero3 through torch DCP, DeepSpeed's
engine) is written by every rank into the same step directory. Per-rank state: RNG streams and, when compression is on,
error-feedback buffers. Resume loads both and drops metrics rows newer than the checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from bigbatch.checkpoint.store import (find_latest_valid, load_checkpoint, prune_checkpoints,
                                       resolve_resume, save_checkpoint)
from bigbatch.config import CheckpointConfig
from bigbatch.metrics import METRICS_FILE, truncate_after


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, runtime: Any, replicated: dict,
                 per_rank: dict, meta_extra: dict, config_text: str, log: Callable[[str], None] = print,
                 sharded: Any = None):
        self.cfg, self.run_dir, self.runtime = cfg, Path(run_dir), runtime
        self.root = self.run_dir / "checkpoints"
        self.replicated, self.per_rank, self.sharded = replicated, per_rank, sharded
        self.meta_extra, self.config_text, self.log = meta_extra, config_text, log
        self.last_saved_step: int | None = None
        self._last_save_time = time.monotonic()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def time_due(self) -> bool:
        """Whether `every_minutes` has elapsed on this rank (ranks agree on it through the trainer)."""
        minutes = self.cfg.every_minutes
        return minutes is not None and time.monotonic() - self._last_save_time >= 60 * minutes

    def maybe_save(self, step: int, samples: int, *, final: bool = False, time_due: bool = False) -> None:
        every = self.cfg.every_steps
        due = (final and self.cfg.at_end) or time_due or (every is not None and step % every == 0)
        if due and step != self.last_saved_step:
            self.save(step, samples)

    def save(self, step: int, samples: int) -> Path:
        path = save_checkpoint(self.root, step, samples, self.replicated, self.per_rank,
                               rank=self.runtime.rank, world_size=self.runtime.world_size,
                               meta_extra=self.meta_extra, files_extra={"config.yaml": self.config_text},
                               barrier=self._barrier, sharded=self.sharded)
        if self.runtime.is_main:
            prune_checkpoints(self.root, self.cfg.keep_last)
        self._barrier()
        self.last_saved_step, self._last_save_time = step, time.monotonic()
        return path

    def resume(self) -> dict | None:
        """Load the checkpoint `checkpoint.resume` names; returns its meta, or None for a fresh start."""
        path = resolve_resume(self.root, self.cfg.resume, log=self.log if self.runtime.is_main else None)
        if path is None:
            return None
        meta = self.load(path)
        if self.runtime.is_main:  # before the metrics file is opened: rows after the checkpoint go
            dropped = truncate_after(self.run_dir / METRICS_FILE, meta["step"])
            self.log(f"resumed from {path} (step {meta['step']}, {meta['samples']} samples"
                     + (f"; dropped {dropped} newer metrics rows)" if dropped else ")"))
        return meta

    def load(self, path: Path) -> dict:
        """Restore every registered state (also used by the guard's rollback, which keeps metrics)."""
        meta = load_checkpoint(path, self.replicated, self.per_rank, rank=self.runtime.rank,
                               world_size=self.runtime.world_size, sharded=self.sharded)
        self.last_saved_step = meta["step"]
        return meta

    def latest(self) -> Path | None:
        return find_latest_valid(self.root)
