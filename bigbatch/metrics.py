"""Metric sinks: metrics.jsonl (one object per step and per eval), TensorBoard, rank-0 progress.

Only the main rank writes. On resume, rows newer than the checkpoint are dropped first
(`truncate_after`), so the file keeps appending without duplicate steps; a torn last line (a kill
or a full disk mid-write) is dropped with a warning. TensorBoard's x-axis is samples: a writer
opened after a resume purges the points past the checkpoint (`purge_step`), and so does a loss-guard
rollback (`rewind`), while metrics.jsonl keeps the rolled-back rows after it. `sync()` (flush and
fsync) runs before every checkpoint, so a checkpoint never points past rows that are not on disk.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A write the run needs failed (a full disk): the message names the file and the errno."""


def describe_os_error(err: OSError) -> str:
    """'PATH: No space left on device (ENOSPC)'."""
    name = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else "no errno"
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err} ({name})"


def storage_error(what: str, err: OSError) -> StorageError:
    return StorageError(f"cannot write {what}: {describe_os_error(err)}")


def parse_rows(path: Path, log=None) -> tuple[list[tuple[dict, bytes, int]], int]:
    """(row, raw line, byte offset of its end) for each row of a metrics file, and the byte length
    of its intact part. A torn last line is dropped with a warning through `log`; a broken line
    before it is a ValueError naming the file and the line number."""
    lines = Path(path).read_bytes().splitlines(keepends=True)
    rows, offset = [], 0
    for number, raw in enumerate(lines, start=1):
        try:
            row = json.loads(raw) if raw.strip() else None
            if row is not None and not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not a metrics row ({err}); fix or remove that "
                                 "line, then resume") from None
            (log or logger.warning)(f"{path}: dropping its torn last line {number} "
                                    f"({len(raw)} bytes, a write cut short)")
            break
        offset += len(raw)
        if row is not None:
            rows.append((row, raw, offset))
    return rows, offset


def truncate_after(path: Path, step: int, log=None) -> int:
    """Drop rows whose step is greater than `step`, and a torn last line; returns how many rows were
    dropped. When the rows kept are the first ones (the usual case) the file is truncated in place,
    which needs no free space on a full disk; otherwise it is rewritten atomically."""
    if not path.exists():
        return 0
    rows, _ = parse_rows(path, log)
    keep = [_step_of(row) <= step for row, _, _ in rows]
    kept = [raw for (_, raw, _), ok in zip(rows, keep) if ok]
    try:
        if all(keep[:len(kept)]):  # the kept rows are a prefix of the file
            end = rows[len(kept) - 1][2] if kept else 0
            if end != path.stat().st_size:
                os.truncate(path, end)
            if kept and not kept[-1].endswith(b"\n"):  # the next row must start on a line of its own
                with open(path, "ab") as f:
                    f.write(b"\n")
        else:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for raw in kept))
            os.replace(tmp, path)
    except OSError as err:
        raise storage_error(f"{path} (dropping rows newer than step {step})", err) from err
    return len(rows) - len(kept)


def _step_of(row: dict) -> float:
    step = row.get("step", 0)
    return step if isinstance(step, (int, float)) else 0


def _named(err: OSError, path: Path) -> OSError:
    return err if err.filename else OSError(err.errno, err.strerror, str(path))


def read_metrics(path: Path) -> list[dict]:
    return [row for row, _, _ in parse_rows(path)[0]]


# Dense (no sparsity) peak FLOP/s of one GPU from NVIDIA's datasheets, by `precision`: bf16 tensor
# cores, and plain fp32 (torch's default: TF32 matmuls are off unless you turn them on).
PEAK_FLOPS = {
    "a100": {"bf16": 312e12, "fp32": 19.5e12},
    "h100-sxm": {"bf16": 989e12, "fp32": 67e12},
    "h100-pcie": {"bf16": 756e12, "fp32": 51e12},
    "h200": {"bf16": 989e12, "fp32": 67e12},
    "l40s": {"bf16": 362e12, "fp32": 91.6e12},
    "l4": {"bf16": 121e12, "fp32": 30.3e12},
    "a10": {"bf16": 125e12, "fp32": 31.2e12},
}
# torch.cuda.get_device_name() -> table key, first match wins ("NVIDIA H100 80GB HBM3" is the SXM part).
# NVL and other variants fall through to "unknown" rather than borrow a neighbour's figure.
GPU_NAMES = ((r"h100.*pcie", "h100-pcie"), (r"h100(?!.*nvl)", "h100-sxm"), (r"h200(?!.*nvl)", "h200"),
             (r"a100", "a100"), (r"l40s", "l40s"), (r"\bl4\b", "l4"), (r"\ba10\b", "a10"))
PEAK_FLOPS_CHOICES = ("auto", "unknown", *PEAK_FLOPS)


def _as_number(setting: float | str) -> float | None:
    """A FLOP/s figure given as a number or as a numeric string ('989e12': YAML reads it as a string)."""
    try:
        return float(setting)
    except (TypeError, ValueError):
        return None


def peak_flops_problems(setting: float | str) -> list[str]:
    """Torch-free check of metrics.peak_flops (composed by bigbatch.validate)."""
    number = _as_number(setting)
    if number is not None:
        ok = math.isfinite(number) and number > 0
        return [] if ok else [f"metrics.peak_flops: {setting} is not a positive FLOP/s figure; use e.g. 989e12"]
    if str(setting).lower() in PEAK_FLOPS_CHOICES:
        return []
    return [f"metrics.peak_flops: unknown '{setting}'; use a FLOP/s figure per device (e.g. 989e12) or one "
            f"of {', '.join(PEAK_FLOPS_CHOICES)}"]


def gpu_key(device_name: str) -> str | None:
    """The PEAK_FLOPS key of a CUDA device name, or None when the table does not know it."""
    name = device_name.lower()
    return next((key for pattern, key in GPU_NAMES if re.search(pattern, name)), None)


def resolve_peak_flops(setting: float | str, device_type: str, device_name: str | None,
                       precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, or None when unknown; where the figure comes from, in words)."""
    number = _as_number(setting)
    if number is not None:
        return number, f"{number:.4g} FLOP/s per device (metrics.peak_flops)"
    key = str(setting).lower()
    if key == "unknown":
        return None, "metrics.peak_flops: unknown"
    if key == "auto":
        if device_type != "cuda":
            return None, f"peak FLOPs unknown on {device_type}"
        key = gpu_key(device_name or "")
        if key is None:
            return None, f"peak FLOPs of '{device_name}' not in bigbatch's table"
    return PEAK_FLOPS[key][precision], f"{PEAK_FLOPS[key][precision]:.4g} FLOP/s per device ({key}, {precision})"


@dataclass(frozen=True)
class Throughput:
    """Sequence-model throughput of a step row: tokens/s in total and per rank, and MFU.

    MFU = model FLOPs per token x tokens/s per rank / peak FLOP/s of one device: the fraction of the
    hardware's peak that the model's own arithmetic (bigbatch.models.flops) uses; reported only when
    both figures are known."""

    tokens_per_sample: int
    world_size: int
    flops_per_token: float | None = None
    peak_flops: float | None = None

    def __call__(self, row: dict) -> dict:
        total = row["samples_per_s"] * self.tokens_per_sample
        out = {"tokens_per_s": total, "tokens_per_s_per_rank": total / self.world_size}
        if self.flops_per_token and self.peak_flops:
            out["mfu"] = self.flops_per_token * out["tokens_per_s_per_rank"] / self.peak_flops
        return out


def rate_text(row: dict) -> str:
    """'1234 tokens/s  MFU 41.2%' for sequence models, else 'N samples/s'."""
    if "tokens_per_s" not in row:
        return f"{row['samples_per_s']:.0f} samples/s"
    mfu = f"  MFU {100 * row['mfu']:.2f}%" if "mfu" in row else ""
    return f"{row['tokens_per_s']:.0f} tokens/s ({row['tokens_per_s_per_rank']:.0f}/rank){mfu}"


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
            extra = {"tok/s": f"{row['tokens_per_s']:.0f}"} if "tokens_per_s" in row else {}
            if "mfu" in row:
                extra["mfu"] = f"{100 * row['mfu']:.1f}%"
            self.bar.set_postfix(step=row["step"], loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}", **extra)
        elif self.enabled and row["step"] % self.log_every == 0:
            print(f"step {row['step']:>6}  samples {row['samples']:>9}  loss {row['loss']:.4f}  "
                  f"lr {row['lr']:.4g}  batch {row['global_batch']}  {rate_text(row)}", flush=True)

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
        self.purge_step: int | None = None

    def start_at(self, samples: int) -> None:
        """Training (re)starts after `samples`: TensorBoard hides points of an earlier life of the run
        beyond it (x = samples; the checkpoint's own row at `samples` stays)."""
        self.purge_step = samples + 1 if samples > 0 else None

    def rewind(self, samples: int) -> None:
        """A rollback restored the state after `samples`: TensorBoard hides its points beyond it, so each
        x shows the values of the training that went on. metrics.jsonl keeps every row (never erased)."""
        if self.tb is None:  # not open yet: it opens with this purge step
            self.start_at(samples)
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        # What SummaryWriter(purge_step=) writes, into the open file: a second event file could sort
        # before this one (same second, name by counter), and readers load files in name order.
        self.tb.file_writer.add_event(Event(step=samples + 1, session_log=SessionLog(status=SessionLog.START)))

    def _open(self) -> None:
        """Opened on the first row, so a resume can first drop rows newer than its checkpoint."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its rows
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self.purge_step)

    def write(self, row: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        try:
            if self._fh is None:
                self._open()
            self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        except OSError as err:
            raise storage_error(f"metrics row of step {row.get('step')}", _named(err, self.path)) from err
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "time") and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, row["samples"])

    def sync(self) -> None:
        """Flush and fsync metrics.jsonl (and flush TensorBoard): called before every checkpoint."""
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as err:
                raise storage_error("metrics before a checkpoint", _named(err, self.path)) from err
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # a full disk: the write that hit it raised (and was reported) already
                pass
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
