"""`bigbatch lr-find` takes the run directory's lock as `train` does: a sweep never writes into a
directory that a live run or another sweep uses; and its lr_find.json is whole or not written."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from bigbatch import exit_codes
from bigbatch.checkpoint.rundir import LOCK_FILE
from bigbatch.cli import main
from tests.conftest import REPO, tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch
from tests.reliability.test_run_lock import start, wait_for_text

pytestmark = pytest.mark.e2e

SWEEP = ["--min-lr", "1e-3", "--max-lr", "1e4", "--steps", "30"]


def refusal(result: subprocess.CompletedProcess, holder_pid: int) -> str:
    """The one stderr line of a run refused because `holder_pid` holds the lock (exit code 2)."""
    assert result.returncode == exit_codes.BAD_INPUT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "in use by another run" in line]
    assert f"host {socket.gethostname()} pid {holder_pid} started " in line
    return line


def test_lr_find_in_a_locked_run_dir_exits_2_and_writes_nothing(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(  # what rank 0 of a live `bigbatch train` holds
        [sys.executable, "-c", "import sys; from bigbatch.checkpoint.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]).acquire(print); print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock_text = (run_dir / LOCK_FILE).read_text()
        line = refusal(bigbatch("lr-find", str(config), *SWEEP), holder.pid)
        assert f"{run_dir} is in use by another run" in line and "choose another run.name" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no lr_find.json, .png, temp file
        assert (run_dir / LOCK_FILE).read_text() == lock_text  # the holder's record is untouched
    finally:
        holder.communicate("")
    # The holder is gone: the same sweep now runs, and releases the lock when it ends.
    assert main(["lr-find", str(config), *SWEEP]) == 0
    assert {"lr_find.json", "lr_find.png"} <= {p.name for p in run_dir.iterdir()}
    assert main(["train", str(config)]) == 0


def test_train_in_a_run_dir_where_lr_find_sweeps_exits_2(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    run_dir = tmp_path / "runs" / "tiny"
    # LRs too small to diverge and far more steps than the test lasts: the sweep is still running.
    sweep = start("lr-find", str(config), "--min-lr", "1e-9", "--max-lr", "2e-9", "--steps", "1000000")
    try:
        wait_for_text(run_dir / LOCK_FILE, f"pid {sweep.pid} ", sweep)
        refusal(bigbatch("train", str(config)), sweep.pid)
        assert sweep.poll() is None  # the sweep goes on undisturbed
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.communicate()
    assert not list(run_dir.glob("lr_find*"))  # a killed sweep leaves no lr_find.json, whole or half


def test_a_failed_write_keeps_the_previous_lr_find_json_whole(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    assert main(["lr-find", str(config), *SWEEP]) == 0
    path = tmp_path / "runs" / "tiny" / "lr_find.json"
    earlier = path.read_bytes()
    real_fsync = os.fsync

    def full_disk(fd):  # the disk fills while lr_find.json is written
        if "lr_find.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(["lr-find", str(config), "--min-lr", "1e-4", "--max-lr", "1e3", "--steps", "20"]) == exit_codes.FAILED
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"cannot write {path}" in line and "(ENOSPC)" in line
    assert path.read_bytes() == earlier and json.loads(earlier)["lrs"][0] == pytest.approx(1e-3)
    assert not list(path.parent.glob("lr_find.json.tmp*"))
