"""Checkpoints as self-describing `step-N/` directories that count only once `meta.json` exists.

Layout under the checkpoint root (one run):

    step-00000120/
        replicated.pt        states identical on every rank (model, optimizer, schedules, counters),
                             written once, by rank 0
        rank-00000.pt        rank 0's own states (RNG streams, compression error feedback, ...)
        rank-00001.pt        ... one file per rank of the world that saved
        config.yaml          `files_extra`: text files stored beside the tensors (resolved config)
        dcp/                 `sharded`: states no single rank holds (zero2/zero3 through torch DCP,
                             DeepSpeed's own files), written by every rank and checksummed like the rest
        meta.json            written LAST: step, samples, world size, version, sha256 of every file

A save writes everything into a hidden sibling `.tmp-step-00000120/`, renames it into place, and only
then writes `meta.json` (itself atomically: temp file, fsync, rename). A directory without a readable
`meta.json` whose checksums match is not a checkpoint, so a process killed at any moment (SIGKILL,
node loss) leaves the previous checkpoint as the newest valid one. Re-saving an existing step moves
the old directory aside to `.old-step-N/` first; until the new one is complete the aside copy still
counts as a checkpoint of step N, so the root never lacks its newest valid checkpoint.

The root must be on a filesystem every rank can see. Only rank 0 renames, deletes and prunes.

meta.json's `finite` says whether the states named by `finite_keys` (the model and optimizer) held
only finite floats when saved. Pruning keeps the newest finite checkpoint, and `find_latest_valid`
prefers it: a diverged run never leaves only NaN checkpoints behind. Sharded states (zero2/zero3) count
too: each rank checks its own shards and one all-reduce (`all_ranks`) combines the answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.distributed.tensor import DTensor

import bigbatch
from bigbatch.checkpoint.durable import fsync_dir, write_durably
from bigbatch.checkpoint.stateful import Stateful
from bigbatch.metrics import StorageError, describe_os_error

logger = logging.getLogger(__name__)

META = "meta.json"
REPLICATED = "replicated.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^(?:\.old-)?step-(\d{8,})$")
_TMP_PREFIX, _OLD_PREFIX, _TRASH_PREFIX = ".tmp-", ".old-", ".trash-"
_RESERVED_META = {"format", "step", "samples", "world_size", "created", "created_unix",
                  "bigbatch_version", "torch_version", "files", "replicated_keys", "per_rank_keys", "finite"}


class InvalidCheckpoint(ValueError):
    """A checkpoint that cannot be loaded (its meta.json, a checksum, or a payload torch refuses)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _test_hook(point: str) -> None:
    """No-op. Tests replace it to kill the process at a named point of a save:
    'written' (all files in the temp dir), 'moved_aside' (old step-N renamed away), 'renamed' (temp
    dir renamed to step-N, no meta.json yet)."""


# ----------------------------------------------------------------------------------------- saving

def save_checkpoint(root: Path, step: int, samples: int, replicated: Mapping[str, Stateful],
                    per_rank: Mapping[str, Stateful], *, rank: int, world_size: int,
                    meta_extra: Mapping[str, Any] | None = None,
                    files_extra: Mapping[str, str] | None = None,
                    barrier: Callable[[], None] | None = None, sharded: Any = None,
                    finite_keys: Iterable[str] = (),
                    all_ranks: Callable[[bool], bool] | None = None) -> Path:
    """Save one checkpoint; every rank calls it with the same step. Returns the step directory.

    A replicated state with a `before_save()` method (a ZeroRedundancyOptimizer gathering its shards
    on rank 0) has it called on every rank first. `sharded` (an object with `dirname`, `save(dir)`
    and `load(dir)`, e.g. `bigbatch.distributed.zero.DCPCheckpoint`) is saved by every rank into
    `step-N/<dirname>/`; its files are checksummed in meta.json like the others.

    meta.json's `finite` covers the `finite_keys` entries of replicated.pt (checked by rank 0) and of
    the state dicts `sharded.save` returns (this rank's shards, checked by every rank; a saver that
    returns None, DeepSpeed's, is not checked). `all_ranks(flag)` is True only when every rank passed
    True (a MIN all-reduce); a sharded save needs it when world_size > 1.

    `barrier` synchronises all ranks (e.g. `torch.distributed.barrier`); it may be left out only when
    world_size is 1. It is called three times: after rank 0 prepared the temp dir, after every rank
    wrote its file, and after rank 0 committed, so no rank returns before the checkpoint exists.

    A failed write (a full disk) removes what this save wrote and raises StorageError naming the
    file and the errno; older checkpoints are untouched.
    """
    if barrier is None:
        if world_size > 1:
            raise ValueError("save_checkpoint: world_size > 1 needs a barrier (torch.distributed.barrier)")
        barrier = _no_barrier
    if all_ranks is None:
        if world_size > 1 and sharded is not None:
            raise ValueError("save_checkpoint: sharded states on world_size > 1 need all_ranks (a MIN "
                             "all-reduce of a flag) to agree on `finite`")
        all_ranks = _only_rank
    root = Path(root)
    final = root / step_dir_name(step)
    try:
        return _save(root, step, samples, replicated, per_rank, rank, world_size, meta_extra, files_extra,
                     barrier, all_ranks, sharded, tuple(finite_keys))
    except (OSError, RuntimeError) as err:
        failure = _os_error_in(err)
        if failure is None:
            raise
        if rank == 0:
            _discard_unfinished(final)
        raise StorageError(f"cannot write checkpoint {final}: {describe_os_error(failure)}; removed the "
                           "unfinished checkpoint, older ones are intact (free space and rerun the same "
                           "command to resume)") from err


def _save(root: Path, step: int, samples: int, replicated: Mapping[str, Stateful],
          per_rank: Mapping[str, Stateful], rank: int, world_size: int, meta_extra: Any, files_extra: Any,
          barrier: Callable[[], None], all_ranks: Callable[[bool], bool], sharded: Any,
          finite_keys: tuple[str, ...]) -> Path:
    extra_meta = dict(meta_extra or {})
    extra_files = dict(files_extra or {})
    _check_extras(extra_meta, extra_files)
    final = root / step_dir_name(step)
    finite = sharded_finite = None
    tmp = root / (_TMP_PREFIX + final.name)
    for state in replicated.values():  # collectives: every rank, before rank 0 writes
        if callable(getattr(state, "before_save", None)):
            state.before_save()

    if rank == 0:  # stale temp dirs can only come from a killed save; one save runs at a time
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root, (_TMP_PREFIX, _TRASH_PREFIX))
        tmp.mkdir()
    barrier()
    if not tmp.is_dir():
        raise RuntimeError(f"rank {rank} cannot see {tmp}; the checkpoint root must be on a filesystem "
                           "shared by all ranks")
    _save_states(tmp / rank_file_name(rank), per_rank)
    if sharded is not None:
        local = _finite_of(sharded.save(tmp / sharded.dirname), finite_keys)
        # The same saver and keys on every rank: all get None (no collective) or all reach it.
        sharded_finite = None if local is None else all_ranks(local)
    if rank == 0:
        payload = _save_states(tmp / REPLICATED, replicated)
        finite = _both_finite(_finite_of(payload, finite_keys), sharded_finite)
        for name, text in extra_files.items():
            write_durably(tmp / name, text.encode("utf-8"))
    barrier()
    if rank == 0:
        _test_hook("written")
        meta = {"format": FORMAT_VERSION, "step": int(step), "samples": int(samples),
                "world_size": int(world_size), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "created_unix": time.time(), "bigbatch_version": bigbatch.__version__,
                "torch_version": torch.__version__,
                "replicated_keys": sorted(replicated), "per_rank_keys": sorted(per_rank),
                **extra_meta, **({} if finite is None else {"finite": finite})}
        expected = [REPLICATED, *(rank_file_name(r) for r in range(world_size)), *extra_files,
                    *(files_under(tmp, sharded.dirname) if sharded is not None else [])]
        _commit(tmp, final, meta, expected)
    barrier()
    return final


def files_under(root: Path, dirname: str) -> list[str]:
    """Every file under root/dirname, as sorted paths relative to root."""
    return sorted(str(p.relative_to(root)) for p in (root / dirname).rglob("*") if p.is_file())


def _commit(tmp: Path, final: Path, meta: dict, files: list[str]) -> None:
    """Rank 0: checksum the temp dir, rename it to its final name, then write meta.json last."""
    missing = [name for name in files if not (tmp / name).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint files missing in {tmp}: {missing}")
    meta["files"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                     for name in files}
    fsync_dir(tmp)
    aside = final.with_name(_OLD_PREFIX + final.name)
    if final.exists():  # re-saving a step: keep the old copy findable until the new one is complete
        if validate_checkpoint(final, checksums=False) is not None:
            _remove_dir(final)  # an unfinished save of this step; an aside copy, if any, stays valid
        else:
            if aside.exists():
                _remove_dir(aside)
            final.rename(aside)
            fsync_dir(final.parent)
            _test_hook("moved_aside")
    tmp.rename(final)
    fsync_dir(final.parent)
    _test_hook("renamed")
    write_durably(final / META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    if aside.exists():
        _remove_dir(aside)


def _save_states(path: Path, states: Mapping[str, Stateful]) -> dict:
    payload = {name: obj.state_dict() for name, obj in states.items()}
    try:
        with open(path, "wb") as f:  # a file object: torch's RuntimeError then chains the OSError
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        failure = _os_error_in(err)
        if failure is None or failure.filename:
            raise
        raise OSError(failure.errno, failure.strerror, str(path)) from err
    return payload


def _finite_of(states: Any, keys: Iterable[str]) -> bool | None:
    """Whether the entries of `states` (a dict of state dicts) named by `keys` are all finite; None
    when it holds none of them (or is not a dict: a saver that returns nothing)."""
    checked = [states[key] for key in keys if key in states] if isinstance(states, Mapping) else []
    return all_finite(checked) if checked else None


def _both_finite(replicated: bool | None, sharded: bool | None) -> bool | None:
    known = [flag for flag in (replicated, sharded) if flag is not None]
    return all(known) if known else None


def all_finite(obj: Any) -> bool:
    """Whether every floating-point tensor in a (nested) state dict is finite. Of a sharded (DTensor)
    value only this rank's shard is checked: combining the ranks' answers is the caller's collective.
    The per-tensor answers stay on their device and are read once per device (on a GPU, one host sync
    per save rather than one per tensor)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in _float_tensors(obj):
        flags.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    return all(bool(torch.stack(found).all()) for found in flags.values())


def _float_tensors(obj: Any) -> Iterable[torch.Tensor]:
    """The floating-point (and complex) tensors of a nested state dict; a DTensor's local shard."""
    if isinstance(obj, Mapping):
        for value in obj.values():
            yield from _float_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _float_tensors(value)
    else:
        if isinstance(obj, DTensor):
            obj = obj.to_local()
        if isinstance(obj, torch.Tensor) and (obj.is_floating_point() or obj.is_complex()):
            yield obj


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err` (torch.save reports a failed write as RuntimeError('unexpected pos'))."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _discard_unfinished(final: Path) -> None:
    """After a failed save: drop its temp dir, and its step dir when the rename happened but
    meta.json could not be written (an aside copy of that step stays valid)."""
    shutil.rmtree(final.with_name(_TMP_PREFIX + final.name), ignore_errors=True)
    if final.is_dir() and not (final / META).is_file():
        shutil.rmtree(final, ignore_errors=True)

def _check_extras(meta_extra: dict, files_extra: dict) -> None:
    clash = sorted(_RESERVED_META & set(meta_extra))
    if clash:
        raise ValueError(f"meta_extra may not set reserved keys {clash}")
    json.dumps(meta_extra)  # fail before writing anything if it is not JSON-serialisable
    for name in files_extra:
        if (not name or name != Path(name).name or name.startswith(".") or name in (META, REPLICATED)
                or re.fullmatch(r"rank-\d+\.pt", name)):
            raise ValueError(f"files_extra name {name!r} must be a plain file name that does not start "
                             f"with '.' and is not {META}, {REPLICATED} or rank-N.pt")


# ------------------------------------------------------------------------------------- validation

def validate_checkpoint(path: Path | str, *, checksums: bool = True) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not.

    With checksums=False only presence and sizes are checked (cheap; catches truncation).
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a directory"
    meta, reason = _read_meta(path)
    if reason:
        return reason
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != meta["step"]:
        return f"meta.json says step {meta['step']} but the directory is {path.name}"
    files = meta["files"]
    needed = [REPLICATED, *(rank_file_name(r) for r in range(meta["world_size"]))]
    absent = [name for name in needed if name not in files]
    if absent:
        return f"meta.json lists no {', '.join(absent)} (data of the world size {meta['world_size']} missing)"
    for name, info in files.items():
        reason = _check_file(path / name, info, checksums)
        if reason:
            return reason
    return None


def _read_meta(path: Path) -> tuple[dict, str | None]:
    meta_path = path / META
    if not meta_path.is_file():
        return {}, "missing meta.json (the save did not finish)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"unreadable meta.json: {err}"
    if not isinstance(meta, dict):
        return {}, "unreadable meta.json: not a JSON object"
    for key, kind in (("step", int), ("samples", int), ("world_size", int), ("files", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return {}, f"meta.json has no valid '{key}'"
    if meta["step"] < 0 or meta["samples"] < 0:
        return {}, f"meta.json has a negative step or samples ({meta['step']}, {meta['samples']})"
    # Each rank wrote a file listed in `files`: a larger world size is made up (and would make the
    # checks below build a list that large).
    if not 1 <= meta["world_size"] <= len(meta["files"]):
        return {}, (f"meta.json has world_size {meta['world_size']}, not between 1 and the "
                    f"{len(meta['files'])} files it lists")
    if "finite" in meta and not isinstance(meta["finite"], bool):
        return {}, "meta.json has a 'finite' that is not true or false"
    return meta, None


def _check_file(path: Path, info: Any, checksum: bool) -> str | None:
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        return f"meta.json has no sha256 for {path.name}"
    if not path.is_file():
        return f"missing file {path.name}"
    size = path.stat().st_size
    if isinstance(info.get("bytes"), int) and size != info["bytes"]:
        return f"{path.name} has {size} bytes, meta.json says {info['bytes']} (truncated or corrupted)"
    if checksum and _sha256(path) != info["sha256"]:
        return f"sha256 mismatch for {path.name} (corrupted)"
    return None


# ------------------------------------------------------------------------------ finding and resume

def _candidates(root: Path) -> list[tuple[int, Path]]:
    """Step directories under root, newest first; `step-N` before its aside copy `.old-step-N`."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), not child.name.startswith(_OLD_PREFIX), child))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [(step, path) for step, _, path in found]


def is_finite(path: Path | str) -> bool:
    """False when meta.json says the saved model/optimizer held non-finite values (unknown: True)."""
    meta, reason = _read_meta(Path(path))
    return reason is not None or meta.get("finite", True) is not False


def find_latest_valid(root: Path | str, log: Callable[[str], None] | None = None,
                      exclude: Iterable[Path] = ()) -> Path | None:
    """The newest valid checkpoint under root with finite weights (meta.json), or None; when every
    valid one holds non-finite values, the newest valid one. Each newer one passed over is reported
    through `log` (default: logging.warning) with the reason. Paths in `exclude` are not considered."""
    report, exclude = log or logger.warning, {Path(p) for p in exclude}
    fallback = None
    for _, path in _candidates(Path(root)):
        if path in exclude:
            continue
        reason = validate_checkpoint(path)
        if reason is None and is_finite(path):
            return path
        if reason is None:
            reason = "its model or optimizer state is not finite (meta.json finite: false)"
            fallback = fallback or path
        report(f"skipping checkpoint {path}: {reason}")
    if fallback is not None:
        report(f"no checkpoint with finite weights; using the newest valid one, {fallback}")
    return fallback


def resolve_resume(root: Path | str, resume: str, log: Callable[[str], None] | None = None) -> Path | None:
    """`checkpoint.resume` -> the directory to resume from, or None to start fresh.

    auto: the newest valid checkpoint under root (None when there is none); never: None; anything
    else is a path to a step directory (relative paths are tried as given, then under root) and
    must be valid, else ValueError naming the key and the reason.
    """
    if resume == "auto":
        return find_latest_valid(root, log)
    if resume == "never":
        return None
    if not resume:
        raise ValueError("checkpoint.resume: empty; use auto, never or a path to a step-N directory")
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists() and (Path(root) / path).exists():
        path = Path(root) / path
    reason = validate_checkpoint(path)
    if reason is not None:
        raise ValueError(f"checkpoint.resume: {path} is not a valid checkpoint: {reason}; "
                         "use auto, never or a path to a complete step-N directory")
    return path


# ---------------------------------------------------------------------------------------- loading

def load_checkpoint(path: Path | str, replicated: Mapping[str, Stateful], per_rank: Mapping[str, Stateful],
                    *, rank: int, world_size: int, strict: bool = False, sharded: Any = None) -> dict:
    """Load a checkpoint into the given objects; returns its meta.json contents.

    Every rank loads replicated.pt; rank r loads rank-r's file. Each file read is checked against its
    sha256 first. When the saved world size differs from this one, per-rank states (RNG streams,
    error feedback) have no owner to go to: they are skipped with a warning, or ValueError when
    strict. An object whose key is missing from the checkpoint is likewise a warning (kept as is), or
    ValueError when strict. States in the checkpoint that nobody asked for are ignored.
    `sharded` (see save_checkpoint) loads from `step-N/<dirname>/` on every rank, resharding when the
    world size changed, after its files' checksums are verified.
    """
    path = Path(path)
    meta, reason = _read_meta(path)
    if reason:
        raise InvalidCheckpoint(f"cannot load {path}: {reason}")
    _load_into(path, REPLICATED, meta, replicated, strict)
    if sharded is not None:
        _load_sharded(path, meta, sharded)
    if not per_rank:
        return meta
    if meta["world_size"] != world_size:
        message = (f"{path} was saved by {meta['world_size']} rank(s), this run has {world_size}: "
                   f"per-rank states {sorted(per_rank)} are not restored")
        if strict:
            raise ValueError(message)
        logger.warning(message)
        return meta
    _load_into(path, rank_file_name(rank), meta, per_rank, strict)
    return meta


def _load_sharded(path: Path, meta: dict, sharded: Any) -> None:
    names = [n for n in meta["files"] if n.startswith(sharded.dirname + "/")]
    if not names:
        raise ValueError(f"cannot load {path}: it holds no {sharded.dirname}/ states; it was saved by a run "
                         f"with another distributed.strategy (meta.json says {meta.get('strategy')!r})")
    for name in names:
        reason = _check_file(path / name, meta["files"][name], checksum=True)
        if reason:
            raise InvalidCheckpoint(f"cannot load {path}: {reason}")
    sharded.load(path / sharded.dirname)


def _load_into(path: Path, name: str, meta: dict, targets: Mapping[str, Stateful], strict: bool) -> None:
    if not targets:
        return
    info = meta["files"].get(name)
    reason = _check_file(path / name, info, checksum=True) if info is not None else f"meta lists no {name}"
    if reason:
        raise InvalidCheckpoint(f"cannot load {path}: {reason}")
    states = _torch_load(path / name)
    missing = sorted(set(targets) - set(states))
    if missing:
        message = f"{path / name} holds no state for {missing} (it has {sorted(states)})"
        if strict:
            raise ValueError(message)
        logger.warning(message + "; those objects keep their current state")
    for key, obj in targets.items():
        if key in states:
            obj.load_state_dict(states[key])


def _torch_load(path: Path) -> dict:
    """torch.load(weights_only=True); a payload it refuses (arbitrary pickled objects) or cannot
    parse makes the checkpoint invalid, never a raw UnpicklingError."""
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidCheckpoint(f"cannot load {path}: torch.load(weights_only=True) refused it: "
                                f"{first}") from None
    if not isinstance(states, dict):
        raise InvalidCheckpoint(f"cannot load {path}: it holds a {type(states).__name__}, "
                                "not a dict of states")
    return states


# ---------------------------------------------------------------------------------------- pruning

def prune_checkpoints(root: Path | str, keep_last: int, run_id: str | None = None) -> list[Path]:
    """Rank 0, between saves: keep the newest `keep_last` valid checkpoints (<= 0 keeps all), delete
    older valid ones, invalid ones not newer than the newest valid one, and leftovers of killed saves.
    Never deletes the newest valid checkpoint, the newest valid one with finite weights (meta.json),
    nor an invalid one newer than the newest valid (kept for inspection).
    With `run_id`, only step dirs whose meta.json names that run count and may go: another run's, or
    one without a readable meta.json, is never deleted. Returns the deleted directories."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = _remove_stale(root, (_TMP_PREFIX, _TRASH_PREFIX))
    candidates = [(step, path, validate_checkpoint(path) is None) for step, path in _candidates(root)
                  if run_id is None or _read_meta(path)[0].get("run_id") == run_id]
    valid = [(step, path) for step, path, ok in candidates if ok]
    if not valid:
        return removed
    newest_step, newest = valid[0]
    names = {path.name for _, path in valid}  # an aside copy is redundant once its step-N is valid
    valid = [(step, path) for step, path in valid
             if not (path.name.startswith(_OLD_PREFIX) and path.name[len(_OLD_PREFIX):] in names)]
    keep = {path for _, path in (valid[:keep_last] if keep_last > 0 else valid)} | {newest}
    keep |= {next((path for _, path in valid if is_finite(path)), newest)}
    for step, path, ok in candidates:
        if path in keep or (not ok and step > newest_step):
            continue
        _remove_dir(path)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------ filesystem helpers

def _no_barrier() -> None:
    pass


def _only_rank(flag: bool) -> bool:
    return flag


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_dir(path: Path) -> None:
    """Rename out of sight first, then delete: a kill mid-delete leaves a `.trash-*` dir, never a
    half-deleted `step-N` that looks like a checkpoint."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(root: Path, prefixes: Iterable[str]) -> list[Path]:
    prefixes = tuple(prefixes)
    stale = [child for child in root.iterdir() if child.name.startswith(prefixes) and child.is_dir()]
    for child in stale:
        shutil.rmtree(child, ignore_errors=True)
    return stale
