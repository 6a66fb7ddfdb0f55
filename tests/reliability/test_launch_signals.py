"""`bigbatch launch` exit codes and signals (issue 14 item 4, issue 13 item 12), and the thread share
under it (issue 14 item 5). Two gloo ranks train a tiny synthetic model; a model defined here marks
the moment training is under way with a file, and the test then signals the launcher (as a terminal's
Ctrl-C, `kill` or Slurm would) and waits for it to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bigbatch.exit_codes import DIVERGED, FAILED, INTERRUPTED, OK
from bigbatch.launch.local import child_pids, failure_exit_code
from tests.conftest import REPO, tiny_config, write_config

pytestmark = [pytest.mark.reliability, pytest.mark.e2e, pytest.mark.slow]

HERE = "tests.reliability.test_launch_signals"


class MarkingMLP(nn.Module):
    """Rank 0 creates `ready_file` at its `ready_at`-th training forward; rank `fail_rank` raises at
    its `fail_at`-th (0: never); every rank writes its thread count to `threads_dir` once.

    `slurm_interrupt_at`: at that forward every rank sends itself SIGINT (its handler runs before the
    next line) and rank 0 then sends one to the launcher, which forwards it to every rank: Slurm's
    `scancel --signal=INT` in torchrun mode, each rank receiving it directly and then forwarded, in
    an order that does not depend on timing. `stall_s`: rank 0 sleeps that long after `ready_file`
    (a stuck rank; rank 1 waits in the gradient all-reduce meanwhile)."""

    def __init__(self, d_in: int, classes: int, ready_file: str = "", ready_at: int = 3,
                 fail_rank: int = -1, fail_at: int = 0, threads_dir: str = "",
                 slurm_interrupt_at: int = 0, stall_s: float = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, classes))
        self.ready_file, self.ready_at, self.fail_rank, self.fail_at = ready_file, ready_at, fail_rank, fail_at
        self.threads_dir, self.calls = threads_dir, 0
        self.slurm_interrupt_at, self.stall_s = slurm_interrupt_at, stall_s

    def forward(self, x):
        if self.training:
            self.calls += 1
            rank = int(os.environ.get("RANK", 0))
            if self.calls == 1 and self.threads_dir:
                record = {"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
                (Path(self.threads_dir) / f"rank{rank}.json").write_text(json.dumps(record))
            if self.calls == self.ready_at and rank == 0 and self.ready_file:
                Path(self.ready_file).touch()
                time.sleep(self.stall_s)
            if self.calls == self.slurm_interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
                if rank == 0:
                    os.kill(os.getppid(), signal.SIGINT)  # the launcher (torchrun's workers are its children)
            if self.calls == self.fail_at and rank == self.fail_rank:
                raise RuntimeError(f"boom in rank {rank} at forward {self.calls}")
        return self.net(x)


def launch_config(tmp_path: Path, max_steps: int = 100_000, **model_kwargs) -> Path:
    model = {"name": f"{HERE}:MarkingMLP", "kwargs": {"d_in": 8, "classes": 3, **model_kwargs}}
    raw = tiny_config(tmp_path, run={"max_steps": max_steps}, model=model,
                      checkpoint={"every_steps": 10**6}, distributed={"timeout_s": 60})
    return write_config(tmp_path / "c.yaml", raw)


def start_launch(tmp_path: Path, config: Path, env: dict | None = None) -> subprocess.Popen:
    out, err = open(tmp_path / "stdout", "w"), open(tmp_path / "stderr", "w")
    return subprocess.Popen([sys.executable, "-m", "bigbatch", "launch", "--nproc-per-node", "2", str(config)],
                            stdout=out, stderr=err, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"launch ended ({proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)  # a poll interval, not a timing assumption


def finish(tmp_path: Path, proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def checkpoints(tmp_path: Path) -> list[str]:
    folder = tmp_path / "runs" / "tiny" / "checkpoints"
    return sorted(p.name for p in folder.glob("step-*") if (p / "meta.json").is_file())


@pytest.mark.parametrize("signum,code,summary", [
    (signal.SIGTERM, OK, "preempted: checkpoint at step"),
    (signal.SIGUSR1, OK, "preempted: checkpoint at step"),
    (signal.SIGINT, INTERRUPTED, "interrupted (Ctrl-C): checkpoint at step"),
])
def test_signal_to_the_launcher_stops_every_rank_with_a_checkpoint(tmp_path, signum, code, summary):
    ready = tmp_path / "ready"
    proc = start_launch(tmp_path, launch_config(tmp_path, ready_file=str(ready)))
    wait_for_file(ready, proc)
    proc.send_signal(signum)
    returncode, out, err = finish(tmp_path, proc)
    assert returncode == code, err[-3000:]
    assert checkpoints(tmp_path), "no checkpoint written"
    assert summary in out
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert "rank failed" not in out + err and "OMP_NUM_THREADS" not in err  # no torchrun banner


def test_an_interrupt_each_rank_receives_twice_still_checkpoints_and_exits_130(tmp_path):
    # Slurm signals every process of the step, so with launch_mode torchrun a rank gets one
    # `scancel --signal=INT` from Slurm and again from the launcher. Before the fix the second
    # killed it (SIGINT's default action was back): exit 130 and no checkpoint.
    proc = start_launch(tmp_path, launch_config(tmp_path, slurm_interrupt_at=4))
    returncode, out, err = finish(tmp_path, proc)
    assert returncode == INTERRUPTED, err[-3000:]
    assert checkpoints(tmp_path) == ["step-00000004"]  # flagged in step 4's forward, saved at its end
    assert "interrupted (Ctrl-C): checkpoint at step 4 saved" in out
    assert "second Ctrl-C" not in out and "Traceback" not in out + err


def test_interrupt_sent_to_the_launcher_and_its_ranks_at_once_checkpoints(tmp_path):
    # What slurmstepd does for `scancel --signal=INT` (proctrack signals every process of the step,
    # torchrun's own session or not): here the arrival order is left to the machine.
    ready = tmp_path / "ready"
    proc = start_launch(tmp_path, launch_config(tmp_path, ready_file=str(ready)))
    wait_for_file(ready, proc)
    for pid in [proc.pid, *child_pids(proc.pid)]:
        os.kill(pid, signal.SIGINT)
    returncode, out, err = finish(tmp_path, proc)
    assert returncode == INTERRUPTED, err[-3000:]
    assert checkpoints(tmp_path), "no checkpoint written"
    assert "interrupted (Ctrl-C): checkpoint at step" in out and "second Ctrl-C" not in out


def test_second_interrupt_to_the_launcher_ends_stuck_ranks_at_once(tmp_path):
    # Rank 0 stalls in a forward and rank 1 waits for it in the all-reduce: no step boundary comes,
    # so only the second Ctrl-C can end them. The launcher announces the first; it is sent once that
    # line is out (two signals before the launcher's handler ran would count as one).
    ready = tmp_path / "ready"
    proc = start_launch(tmp_path, launch_config(tmp_path, ready_file=str(ready), stall_s=120))
    wait_for_file(ready, proc)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while "interrupt again" not in (tmp_path / "stdout").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the first interrupt was not announced"
        time.sleep(0.05)  # a poll interval, not a timing assumption
    proc.send_signal(signal.SIGINT)
    returncode, out, err = finish(tmp_path, proc, timeout=50)  # the stall is 120 s, gloo's timeout 60 s
    assert returncode == INTERRUPTED, err[-3000:]
    assert "bigbatch launch: second Ctrl-C: ranks ended without waiting for a checkpoint" in out
    assert checkpoints(tmp_path) == [] and "rank 0 failed" not in out


def test_failing_rank_gives_one_line_naming_rank_exit_code_and_error(tmp_path):
    proc = start_launch(tmp_path, launch_config(tmp_path, fail_rank=1, fail_at=3))
    returncode, out, err = finish(tmp_path, proc)
    assert returncode == FAILED
    lines = [line for line in (out + err).splitlines() if line.startswith("bigbatch launch:")]
    assert len(lines) == 1, out + err
    assert lines[0].startswith("bigbatch launch: rank 1 failed (exit code 1): "
                               "RuntimeError: boom in rank 1 at forward 3 (traceback: ")
    assert "Traceback" not in out + err  # no page of tracebacks: it is in the file the line names
    traceback_file = Path(lines[0].rsplit("(traceback: ", 1)[1].rstrip(")"))
    text = traceback_file.read_text()
    assert text.startswith("Traceback") and "RuntimeError: boom in rank 1" in text


@pytest.mark.parametrize("user_threads", [None, "3"])
def test_ranks_use_their_share_of_the_cores_unless_the_user_set_omp_num_threads(tmp_path, user_threads):
    threads_dir = tmp_path / "threads"
    threads_dir.mkdir()
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if user_threads:
        env["OMP_NUM_THREADS"] = user_threads
    config = launch_config(tmp_path, max_steps=2, threads_dir=str(threads_dir))
    proc = subprocess.run([sys.executable, "-m", "bigbatch", "launch", "--nproc-per-node", "2", str(config)],
                          capture_output=True, text=True, timeout=240, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Setting OMP_NUM_THREADS" not in proc.stderr and "*****" not in proc.stderr  # no banner
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for rank in (0, 1):
        record = json.loads((threads_dir / f"rank{rank}.json").read_text())
        assert record["threads"] == (int(user_threads) if user_threads else share)
        assert record["omp"] == (user_threads or str(share))


# ----------------------------------------------------------------------------- exit-code rules

class Failure:
    """Stands in for torchrun's ProcessFailure."""

    def __init__(self, exitcode: int, timestamp: int = 100, error_file_data=None):
        self.exitcode, self.timestamp, self.error_file = exitcode, timestamp, "/nonexistent/error.json"
        self.error_file_data = error_file_data or {"message": "<NONE>"}


def test_second_ctrl_c_exits_130_and_says_no_checkpoint_was_awaited(capsys):
    # The launcher's second Ctrl-C KILLs the ranks; a rank may have finished (130) just before.
    failures = {0: Failure(-signal.SIGKILL), 1: Failure(INTERRUPTED)}
    assert failure_exit_code(failures, [signal.SIGINT, signal.SIGINT]) == INTERRUPTED
    assert "second Ctrl-C" in capsys.readouterr().out


def test_a_rank_killed_after_a_single_ctrl_c_is_a_failure(capsys):
    # One interrupt never KILLs a rank (the launcher sends KILL only on its second): someone else did.
    assert failure_exit_code({1: Failure(-signal.SIGKILL)}, [signal.SIGINT]) == FAILED
    assert "rank 1 failed (killed by SIGKILL)" in capsys.readouterr().out


def test_ranks_ended_by_torchruns_term_after_a_ctrl_c_count_as_stopped(capsys):
    failures = {1: Failure(INTERRUPTED), 0: Failure(-signal.SIGTERM)}
    assert failure_exit_code(failures, [signal.SIGINT]) == INTERRUPTED
    assert capsys.readouterr().out == ""


def test_first_failure_is_the_earliest_recorded_and_its_exit_code_is_kept(capsys):
    def recorded(ns):
        return {"message": {"message": f"E{ns}", "extraInfo": {"timestamp_ns": ns}}}

    failures = {0: Failure(1, error_file_data=recorded(2_000)), 1: Failure(3, error_file_data=recorded(1_000))}
    assert failure_exit_code(failures, []) == 3
    assert capsys.readouterr().out == "bigbatch launch: rank 1 failed (exit code 3): E1000\n"
    killed = {2: Failure(-signal.SIGKILL, timestamp=1)}
    assert failure_exit_code(killed, [signal.SIGTERM]) == FAILED
    assert "rank 2 failed (killed by SIGKILL): no error recorded" in capsys.readouterr().out
    diverged = {0: Failure(DIVERGED), 1: Failure(DIVERGED)}
    assert failure_exit_code(diverged, []) == DIVERGED
    assert capsys.readouterr().out == ("bigbatch launch: rank 0 failed (exit code 3): training diverged "
                                       "(rank 0's summary is above)\n")
