"""Durable small writes: a file is either its old or its new content, never half, even on power loss."""

from __future__ import annotations

import os
from pathlib import Path

from bigbatch.metrics import storage_error


def write_durably(path: Path, data: bytes) -> None:
    """Write via a temp file, fsync, rename, fsync the directory. A failed write (a full disk) removes
    the temp file and raises StorageError naming the file and the errno; `path` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(str(path), err if err.filename else OSError(err.errno, err.strerror, str(tmp))) from err
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (best effort where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)
