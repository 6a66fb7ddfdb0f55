"""When to checkpoint, what goes in, and resuming: the trainer's side of the checkpoint store.

Replicated state (written once, by rank 0): model, optimizer, counters, sampler identity, guard and
any extra Statefuls a strategy registers. Sharded state (zero2/zero3 through torch DCP, DeepSpeed's
engine) is written by every rank into the same step directory. Per-rank state: RNG streams and, when compression is on,
error-feedback buffers. Resume loads both and drops metrics rows newer than the checkpoint; a
checkpoint that passes its checksums but cannot be loaded (a payload torch refuses) is reported and
the previous one is tried. `before_save` callbacks (the metrics sync) run before every save.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from bigbatch.checkpoint.store import (InvalidCheckpoint, find_latest_valid, load_checkpoint,
                                       prune_checkpoints, resolve_resume, save_checkpoint)
from bigbatch.config import CheckpointConfig
from bigbatch.metrics import METRICS_FILE, truncate_after


FINITE_KEYS = ("model", "optimizer")  # meta.json's `finite` covers these states, replicated or sharded


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, runtime: Any, replicated: dict,
                 per_rank: dict, meta_extra: dict, config_text: str, log: Callable[[str], None] = print,
                 sharded: Any = None):
        self.cfg, self.run_dir, self.runtime = cfg, Path(run_dir), runtime
        self.root = self.run_dir / "checkpoints"
        self.replicated, self.per_rank, self.sharded = replicated, per_rank, sharded
        self.meta_extra, self.config_text, self.log = meta_extra, config_text, log
        self.last_saved_step: int | None = None
        self.before_save: list[Callable[[], None]] = []
        self.before_load: Callable[[Path], None] | None = None  # e.g. the config check of a resume
        self._last_save_time = time.monotonic()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _all_ranks(self, flag: bool) -> bool:
        """True only when `flag` is True on every rank: whether all shards of a sharded save are finite."""
        if not dist.is_initialized():
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.runtime.device)  # nccl: a GPU tensor
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

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
        for hook in self.before_save:
            hook()
        path = save_checkpoint(self.root, step, samples, self.replicated, self.per_rank,
                               rank=self.runtime.rank, world_size=self.runtime.world_size,
                               meta_extra=self.meta_extra, files_extra={"config.yaml": self.config_text},
                               barrier=self._barrier, sharded=self.sharded, finite_keys=FINITE_KEYS,
                               all_ranks=self._all_ranks)
        if self.runtime.is_main:
            prune_checkpoints(self.root, self.cfg.keep_last, run_id=self.meta_extra.get("run_id"))
        self._barrier()
        self.last_saved_step, self._last_save_time = step, time.monotonic()
        return path

    def resume(self) -> dict | None:
        """Load the checkpoint `checkpoint.resume` names; returns its meta, or None for a fresh start."""
        log = self.log if self.runtime.is_main else None
        path, tried = resolve_resume(self.root, self.cfg.resume, log=log), []
        while path is not None:
            if self.before_load is not None:
                self.before_load(path)
            try:
                meta = self.load(path)
                break
            except InvalidCheckpoint as err:
                if self.cfg.resume != "auto":  # an explicit path: exit 2 with the reason
                    raise
                tried.append(path)
                if log is not None:
                    log(f"skipping checkpoint {path}: invalid ({err}), trying the previous one")
                path = find_latest_valid(self.root, log, exclude=tried)
        if path is None:
            return None
        if self.runtime.is_main:  # before the metrics file is opened: rows after the checkpoint go
            dropped = truncate_after(self.run_dir / METRICS_FILE, meta["step"], log=self.log)
            self.log(f"resumed from {path} (step {meta['step']}, {meta['samples']} samples"
                     + (f"; dropped {dropped} newer metrics rows)" if dropped else ")"))
        return meta

    def load(self, path: Path) -> dict:
        """Restore every registered state (also used by the guard's rollback, which keeps metrics)."""
        meta = load_checkpoint(path, self.replicated, self.per_rank, rank=self.runtime.rank,
                               world_size=self.runtime.world_size, sharded=self.sharded)
        self.last_saved_step = meta["step"]
        return meta

    def latest(self, log: Callable[[str], None] | None = None) -> Path | None:
        return find_latest_valid(self.root, log)
