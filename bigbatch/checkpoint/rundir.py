"""A run directory belongs to one run: its identity, its lock, `run.if_exists`, resume checks.

- Identity: `RUN_DIR/run.json` holds a run id made at the run's first start. Every checkpoint's
  meta.json records it (`run_id`) and pruning deletes only checkpoints that carry this run's id.
- Lock: global rank 0 holds a POSIX record lock (`fcntl.lockf`) on `RUN_DIR/.lock` for the life of
  the process, its holder (host, pid, start time) written in the file. The kernel drops it when the
  process ends, however it ends (SIGKILL included); on NFS the lock manager (NFSv4 leases, lockd on
  v3) does the same for a dead client once its lease expires. A file system without POSIX locks
  (Lustre mounted without `-o flock`/`-o localflock`) makes it a warning: the run goes on unlocked.
- `run.if_exists` decides what a start does with a directory that already holds a run.
- Before a checkpoint is loaded, its resolved config (`step-N/config.yaml`) is compared with this one.

Everything here but `open_run` (and the shape check it calls) is torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from bigbatch.checkpoint.durable import write_durably

RUN_FILE, LOCK_FILE, METRICS_FILE = "run.json", ".lock", "metrics.jsonl"
# Keys that may change between a checkpoint and its resume: they change how long, what is logged
# and where, not what the saved state means.
MAY_CHANGE = ("run.name", "run.out_dir", "run.if_exists", "run.max_steps", "run.max_samples", "run.epochs",
              "eval", "metrics", "checkpoint", "slurm", "distributed.timeout_s", "remat.measure_every_steps",
              "data.prefetch", "model.compile",  # when batches are read, how forward runs: not what is saved
              "ema.eval_with_ema")  # which weights evaluations read, not what is saved
_UNSET = "(unset)"
_NOT_SHOWN = ("checkpoint.resume", "checkpoint.allow_config_change")  # how to resume, not what


class RunDirError(ValueError):
    """Bad input about the run directory or a resume: one line, exit code 2."""


# ------------------------------------------------------------------------------------------ names

def run_name_problems(run_cfg: Any) -> list[str]:
    """`run.name` must be one plain directory name, so the run dir stays inside `run.out_dir`."""
    name = run_cfg.name
    bad = (name in ("", ".", "..") or name != name.strip() or "\0" in name
           or any(sep in name for sep in ("/", "\\", os.sep, os.altsep) if sep))
    if not bad:
        return []
    return [f"run.name: {name!r} must be a plain directory name (no '/', '\\', '..' or surrounding "
            f"spaces): the run directory is run.out_dir/run.name; put parent folders in run.out_dir"]


# ------------------------------------------------------------------------------------------- lock

_HELD: dict[str, "RunDirLock"] = {}  # POSIX locks belong to the process: one fd per lock file


class RunDirLock:
    """Rank 0's exclusive lock on RUN_DIR/.lock; closing its fd (or dying) releases it.

    Never open the lock file a second time in the holding process: closing any fd of a file drops
    the process's POSIX locks on it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.key: str | None = None

    def acquire(self, log: Callable[[str], None]) -> "RunDirLock":
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is not None and held.fd is not None:
            return held
        fd = self._locked_fd(log)
        if fd is None:
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        os.fsync(fd)
        self.fd, self.key = fd, key
        _HELD[key] = self
        return self

    def _locked_fd(self, log: Callable[[str], None]) -> int | None:
        """An fd locking the file now at self.path; None where the file system has no locks."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    raise RunDirError(f"run.name: {self.path.parent} is in use by another run "
                                      f"({lock_holder(self.path)}); wait for it to end, or choose another "
                                      "run.name") from None
                log(f"warning: cannot lock {self.path} ({os.strerror(err.errno)}): this file system has "
                    "no POSIX locks (Lustre: mount with -o flock); running without the run-directory lock")
                return None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # the directory was archived between open and lock: lock the new file

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if _HELD.get(self.key) is self:
                del _HELD[self.key]


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def release_run_dir(run_dir: Path) -> None:
    """Drop this process's lock on run_dir, if it holds one (the run ended; death drops it too)."""
    held = _HELD.get(str((Path(run_dir) / LOCK_FILE).resolve()))
    if held is not None:
        held.release()


def lock_holder(path: Path) -> str:
    try:
        return Path(path).read_text().strip() or "holder not yet written"
    except OSError as err:
        return f"holder unreadable: {err}"


# --------------------------------------------------------------------------------- run identity

def read_run_info(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"run.name: {path} is unreadable ({err}); set run.if_exists: archive to move "
                          "this run directory aside, or choose another run.name") from None
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
        raise RunDirError(f"run.name: {path} has no run_id; set run.if_exists: archive to move this run "
                          "directory aside, or choose another run.name")
    return info


def write_run_info(run_dir: Path, info: dict) -> None:
    write_durably(Path(run_dir) / RUN_FILE, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())


def current_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def is_restart(info: dict | None) -> bool:
    """The same job starting again (a Slurm requeue keeps its job id; torchrun counts restarts)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        return True
    return info is not None and current_job() is not None and info.get("job") == current_job()


def describe_used(run_dir: Path) -> str | None:
    """What shows that run_dir holds a run ('checkpoints up to step-00000020, metrics.jsonl'), or None.
    Other files (job.sbatch, lr_find.png, an empty run.json) do not count."""
    run_dir, found = Path(run_dir), []
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    if steps:
        found.append(f"checkpoints up to {steps[-1]}")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    return ", ".join(found) or None


# ------------------------------------------------------------------------------------- claiming

@dataclass
class Claim:
    """Rank 0's hold on a run directory, decided before anything is loaded or written."""

    run_dir: Path
    run_id: str
    lineage: bool  # the directory already held this run: rows it wrote are this run's to drop
    created: list[Path]  # directories this start made, deepest first (removed if the start fails)
    lock: RunDirLock
    info: dict

    def started(self, config_hash: str) -> None:
        """Training starts: record the run (first start) and this start in run.json."""
        info = self.info or {"run_id": self.run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "config_hash": config_hash}
        self.info = {**info, "job": current_job(), "last_start": lock_text()}
        write_run_info(self.run_dir, self.info)

    def abandon(self) -> None:
        """The start failed before training: leave nothing behind in a directory this start made."""
        self.lock.release()
        if self.created:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty: something else was put there meanwhile; keep it
                return


def lock_text() -> str:
    return f"host {socket.gethostname()} pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"


def claim_run_dir(run_dir: Path, if_exists: str, resume: str, log: Callable[[str], None]) -> Claim:
    """Rank 0: lock run_dir and apply `run.if_exists`; RunDirError (nothing changed) when refused."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.name: {run_dir} exists and is not a directory; choose another run.name")
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(run_dir).acquire(log)
    try:
        info, used = read_run_info(run_dir), describe_used(run_dir)
        if used and if_exists == "archive" and not is_restart(info):
            _check_resume_outside(run_dir, resume)
            lock, info = archive_run_dir(run_dir, lock, log), None
        elif used and if_exists == "error":
            raise RunDirError(f"run.if_exists: error, and {run_dir} already holds a run ({used}); choose "
                              "another run.name, or set run.if_exists: resume to continue it or archive to "
                              "move it aside")
        elif used and resume == "never":
            raise RunDirError(f"checkpoint.resume: never, but {run_dir} already holds a run ({used}); set "
                              "run.if_exists: archive to move it aside and start fresh, choose another "
                              "run.name, or set checkpoint.resume: auto to continue it")
    except BaseException:
        Claim(run_dir, "", False, created, lock, {}).abandon()
        raise
    run_id = info["run_id"] if info else uuid.uuid4().hex
    return Claim(run_dir, run_id, lineage=info is not None, created=created, lock=lock, info=info or {})


def _check_resume_outside(run_dir: Path, resume: str) -> None:
    if resume in ("auto", "never"):
        return
    inside = run_dir.resolve()
    for path in (Path(resume).expanduser(), run_dir / "checkpoints" / resume):
        if path.exists() and path.resolve().is_relative_to(inside):
            raise RunDirError(f"checkpoint.resume: {resume} is inside {run_dir}, which run.if_exists: "
                              "archive moves aside; resume from the archived copy's path, or set "
                              "run.if_exists: resume")


def archive_path(run_dir: Path) -> Path:
    stem = f"{run_dir.name}.archived-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = run_dir.with_name(stem), 1
    while path.exists():
        n += 1
        path = run_dir.with_name(f"{stem}-{n}")
    return path


def archive_run_dir(run_dir: Path, lock: RunDirLock, log: Callable[[str], None]) -> RunDirLock:
    """Rename run_dir to a dated sibling (its lock goes with it), then lock a fresh run_dir."""
    target = archive_path(run_dir)
    os.rename(run_dir, target)
    _HELD.pop(lock.key, None)  # the held lock file moved with the directory; held until the new one is
    log(f"run.if_exists: archive: moved the earlier run in {run_dir} to {target}")
    run_dir.mkdir()
    try:
        return RunDirLock(run_dir).acquire(log)
    finally:
        lock.release()


# ----------------------------------------------------------------------------- config comparison

def flatten(tree: Any, sections: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, descending only into the sections `sections` (the defaults)
    has: free-form mappings (model.kwargs, slurm.env) and lists stay whole values."""
    if not (isinstance(tree, dict) and isinstance(sections, dict) and sections):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, sections.get(key), f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: dict, current: dict, defaults: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every key whose value differs; a key the saved config predates
    counts as its default."""
    old, new, default = (flatten(tree, defaults) for tree in (saved, current, defaults))
    return [(key, old.get(key, default.get(key, _UNSET)), value) for key, value in new.items()
            if old.get(key, default.get(key, _UNSET)) != value]


def may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in MAY_CHANGE)


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {json.dumps(old)} → {json.dumps(new)}" for key, old, new in changes)


def resume_config_check(checkpoint: Path, current: dict, defaults: dict, allow: bool,
                        log: Callable[[str], None]) -> list[tuple[str, Any, Any]]:
    """Compare step-N/config.yaml with this run's config before loading it. Returns the changes the
    user opted into (allow_config_change); RunDirError when others changed without opting in."""
    saved_path = Path(checkpoint) / "config.yaml"
    if not saved_path.is_file():
        log(f"warning: {checkpoint} holds no config.yaml; resuming without comparing configs")
        return []
    saved = yaml.safe_load(saved_path.read_text()) or {}
    changes = [c for c in config_changes(saved, current, defaults) if c[0] not in _NOT_SHOWN]
    harmless = [c for c in changes if may_change(c[0])]
    others = [c for c in changes if not may_change(c[0])]
    if others and not allow:
        raise RunDirError(f"checkpoint.resume: {checkpoint} was saved with another config: "
                          f"{format_changes(others)}; restore those values to resume, start a new run "
                          "(another run.name, or run.if_exists: archive), or set "
                          "checkpoint.allow_config_change: true to load it anyway")
    if harmless:
        log(f"config changes since {checkpoint.name}: {format_changes(harmless)}")
    if others:
        log(f"checkpoint.allow_config_change: loading {checkpoint} despite {format_changes(others)}")
    return others


def shape_problems(checkpoint: Path, model: Any) -> list[str]:
    """Parameters whose shape differs between the checkpoint's model and this one (replicated.pt;
    sharded strategies keep the model elsewhere and are not checked here)."""
    import torch

    replicated = Path(checkpoint) / "replicated.pt"
    if model is None or not hasattr(model, "state_dict") or not replicated.is_file():
        return []
    saved = torch.load(replicated, map_location="cpu", weights_only=True, mmap=True).get("model")
    if not isinstance(saved, dict):
        return []
    current = model.state_dict()
    problems = [f"{name}: checkpoint {list(saved[name].shape)}, this config {list(t.shape)}"
                for name, t in current.items() if name in saved and saved[name].shape != t.shape]
    problems += [f"{name}: only in this config" for name in current if name not in saved]
    problems += [f"{name}: only in the checkpoint" for name in saved if name not in current]
    return problems


# ------------------------------------------------------------------------------- the whole start

@contextlib.contextmanager
def holding_run_dir(run_dir: Path, runtime: Any, log: Callable[[str], None]) -> Iterator[None]:
    """Rank 0 holds RUN_DIR/.lock while the body runs, for a command that writes into a run directory
    without being its run (`bigbatch lr-find`; `train` claims it through `open_run`). Held by a live
    run, every rank stops before the body, as in open_run: rank 0 with the RunDirError naming the
    holder, the others with exit code 2."""
    error = None
    if runtime.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            RunDirLock(run_dir).acquire(log)
        except RunDirError as err:
            error = str(err)
    [error] = _share(runtime, (error,))
    if error:
        if runtime.is_main:
            raise RunDirError(error)
        raise SystemExit(2)  # every rank reached the same verdict: rank 0 prints it once
    try:
        yield
    finally:
        if runtime.is_main:
            release_run_dir(run_dir)


def open_run(cfg: Any, runtime: Any, checkpointer: Any) -> dict | None:
    """Before training: rank 0 claims the run directory, every rank checks and resumes, rank 0
    records the start. Returns the resumed checkpoint's meta (None: fresh start)."""
    try:
        return _open_run(cfg, runtime, checkpointer)
    except RunDirError:
        if runtime.is_main:
            raise
        raise SystemExit(2) from None  # every rank reached the same verdict: rank 0 prints it once


def _open_run(cfg: Any, runtime: Any, checkpointer: Any) -> dict | None:
    log = checkpointer.log
    claim, error = None, None
    if runtime.is_main:
        try:
            claim = claim_run_dir(cfg.run_dir, cfg.run.if_exists, cfg.checkpoint.resume, log)
        except RunDirError as err:
            error = str(err)
    run_id, lineage, error = _share(runtime, (claim.run_id if claim else None,
                                               claim.lineage if claim else False, error))
    if error:
        raise RunDirError(error)
    checkpointer.meta_extra["run_id"] = run_id
    try:
        meta = _resume(cfg, checkpointer, lineage, runtime.is_main)
    except BaseException:
        if claim is not None:
            claim.abandon()
        raise
    if claim is not None:
        claim.started(cfg.digest())
    if runtime.distributed:
        # Rank 0 writes metrics rows as soon as it trains (the first batch event precedes any
        # collective): a slower rank still checking for an earlier run's rows would find them.
        import torch.distributed as dist

        dist.barrier()
    return meta


def _share(runtime: Any, value: tuple) -> tuple:
    """Rank 0's value on every rank."""
    if not runtime.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _resume(cfg: Any, checkpointer: Any, lineage: bool, is_main: bool) -> dict | None:
    opted_in: list = []
    current = cfg.model_dump(mode="json")
    defaults = type(cfg)().model_dump(mode="json")

    def check(path: Path) -> None:
        opted_in[:] = resume_config_check(path, current, defaults, cfg.checkpoint.allow_config_change,
                                          checkpointer.log if is_main else _quiet)
        if opted_in:
            problems = shape_problems(path, checkpointer.replicated.get("model"))
            if problems:
                raise RunDirError(f"checkpoint.allow_config_change: {path} does not fit this model: "
                                  f"{'; '.join(problems)}; restore the model config to resume from it")

    checkpointer.before_load = check
    try:
        meta = checkpointer.resume()
    except (KeyError, RuntimeError, ValueError) as err:
        from bigbatch.checkpoint.store import InvalidCheckpoint

        if not opted_in or isinstance(err, (RunDirError, InvalidCheckpoint)):
            raise
        text = " ".join(str(err).split())
        raise RunDirError(f"checkpoint.allow_config_change: the checkpoint cannot be loaded after changing "
                          f"{', '.join(k for k, _, _ in opted_in)} ({type(err).__name__}: {text}); restore "
                          "those values, or start a new run") from None
    if meta is None:
        _fresh_start(cfg.run_dir, lineage, cfg.checkpoint.resume, checkpointer.log, is_main)
    elif is_main:
        for warning in inexact_resume_warnings(cfg):
            checkpointer.log(warning)
    return meta


def inexact_resume_warnings(cfg: Any) -> list[str]:
    """What a resumed run of `cfg` cannot restore (it still runs; the user should know)."""
    if cfg.compression.method == "torch_powersgd":
        return ["warning: compression.method torch_powersgd: torch's hook keeps its error feedback, warm Q and "
                "step count outside bigbatch's checkpoints, so they restart here (plain all-reduce for "
                "compression.start_step steps) and this run will not match an uninterrupted one; "
                "compression.method: powersgd resumes exactly"]
    return []


def _fresh_start(run_dir: Path, lineage: bool, resume: str, log: Callable[[str], None], is_main: bool) -> None:
    """No checkpoint to resume from: rows of this run's earlier attempt go; another run's stay."""
    metrics = Path(run_dir) / METRICS_FILE
    if resume == "never" or not (metrics.is_file() and metrics.stat().st_size > 0):
        return
    if not lineage:
        raise RunDirError(f"run.name: {run_dir} holds {METRICS_FILE} of an earlier run (no run.json) and no "
                          "checkpoint to resume from; set run.if_exists: archive to move it aside, or choose "
                          "another run.name")
    if is_main:
        from bigbatch.metrics import truncate_after

        dropped = truncate_after(metrics, 0)
        log(f"no checkpoint to resume from: starting at step 0; dropped {dropped} metrics rows of an "
            "earlier attempt of this run")


def _quiet(text: str) -> None:
    pass
