"""Metric sinks: metrics.jsonl (one object per step and per eval), TensorBoard, rank-0 progress.

Only the main rank writes. On resume, rows newer than the checkpoint are dropped first
(`truncate_after`), so the file keeps appending without duplicate steps.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def truncate_after(path: Path, step: int) -> int:
    """Drop rows whose step is greater than `step` (atomically); returns how many were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """tqdm bar on a TTY, plain periodic lines otherwise (CI logs, Slurm output files)."""

    def __init__(self, mode: str, total_samples: int, log_every: int, active: bool = True):
        """`active` is False on every rank but the main one; mode "none" keeps only messages."""
        self.log_every, self.bar, self.active = log_every, None, active
        use_bar = active and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.enabled = active and mode != "none"
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_samples, unit="sample",
                            unit_scale=True, dynamic_ncols=True)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(row["global_batch"])
            self.bar.set_postfix(step=row["step"], loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}")
        elif self.enabled and row["step"] % self.log_every == 0:
            print(f"step {row['step']:>6}  samples {row['samples']:>9}  loss {row['loss']:.4f}  "
                  f"lr {row['lr']:.4g}  batch {row['global_batch']}  {row['samples_per_s']:.0f} samples/s",
                  flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.active:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsWriter:
    """Appends rows to RUN_DIR/metrics.jsonl and mirrors numeric values to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.path, self.tensorboard = enabled, Path(run_dir) / METRICS_FILE, tensorboard
        self._fh, self.tb = None, None

    def _open(self) -> None:
        """Opened on the first row, so a resume can first drop rows newer than its checkpoint."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its rows
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, row: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self._fh is None:
            self._open()
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "time") and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, row["samples"])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class StepTimer:
    """Wall time of one optimizer step (perf_counter; never used in tests)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
