"""Issue 13, item 4: two runs in one run dir at once. Global rank 0 holds RUN_DIR/.lock for the life
of the run; a second run stops at once with exit 2 naming the holder; the lock dies with its process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bigbatch.checkpoint.rundir import LOCK_FILE, RunDirError, RunDirLock
from tests.conftest import REPO, tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

import pytest


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bigbatch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until `path` contains `text`; fail early if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before {path} showed {text!r}: "
                        f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)  # a poll interval, not a timing assumption
    pytest.fail(f"{path} did not show {text!r} within {timeout} s")


@pytest.mark.parametrize("second_cmd", [["train"], ["launch", "--nproc-per-node", "2"]], ids=["train", "launch"])
def test_second_run_in_a_locked_dir_exits_2_naming_the_holder(tmp_path, second_cmd):
    raw = tiny_config(tmp_path, run={"max_steps": None, "max_samples": 10**9},
                      checkpoint={"every_steps": 5, "keep_last": 2})
    config = str(write_config(tmp_path / "c.yaml", raw))
    lock = tmp_path / "runs" / "tiny" / LOCK_FILE
    first = start("train", config)
    try:
        wait_for_text(lock, f"pid {first.pid} ", first)
        second = bigbatch(*second_cmd, config)  # under launch both ranks stop, rank 0 says why
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        messages = [line for line in second.stderr.splitlines() if "in use by another run" in line]
        assert len(messages) == 1, second.stderr
        assert f"host {socket.gethostname()} pid {first.pid} started " in messages[0]
        assert first.poll() is None  # the holder goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The kernel released the dead holder's lock: a third run takes it (and resumes the killed run).
    third = start("train", config, "--set", "run.max_samples=32")
    out, err = third.communicate(timeout=240)
    assert third.returncode == 0, err[-3000:]
    assert "done:" in out
    assert f"pid {third.pid} " in lock.read_text()


def test_lock_is_exclusive_between_processes_and_released_on_exit(tmp_path):
    holder = tmp_path / "holder.py"
    holder.write_text(
        "import sys, time\n"
        "from bigbatch.checkpoint.rundir import RunDirLock\n"
        "RunDirLock(sys.argv[1]).acquire(print)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, str(holder), str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {proc.pid} "):
            RunDirLock(tmp_path).acquire(print)
    finally:
        proc.communicate("")  # stdin closed: the holder exits normally
    mine = RunDirLock(tmp_path).acquire(print)
    assert mine.fd is not None and f"pid {os.getpid()} " in (tmp_path / LOCK_FILE).read_text()
    mine.release()


def test_lock_is_released_when_an_in_process_run_returns(tmp_path):
    from bigbatch.cli import main

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    assert main(["train", str(config)]) == 0
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from bigbatch.checkpoint.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]).acquire(print); print('locked')", str(tmp_path / "runs" / "tiny")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert probe.returncode == 0 and probe.stdout.strip() == "locked", probe.stderr[-3000:]
