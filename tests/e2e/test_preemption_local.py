"""SIGUSR1 to a running job: all ranks checkpoint at a step boundary, exit 0, and resume exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_config, write_config
from tests.e2e.test_resume import losses

pytestmark = pytest.mark.e2e


def test_usr1_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path):
    # The model signals its own launcher group at its 6th training forward (step 6), like Slurm's
    # `scancel --signal=USR1` would; no requeue outside Slurm.
    def config(name, signal_at):
        model = {"name": "tests.custom_components:SignallingMLP",
                 "kwargs": {"d_in": 8, "classes": 3, "signal_at": signal_at}}
        raw = tiny_config(tmp_path, run={"name": name, "max_steps": 10}, model=model,
                          checkpoint={"every_steps": 100})
        return str(write_config(tmp_path / f"{name}.yaml", raw))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "bigbatch", "launch", "--nproc-per-node", "2"]
    first = subprocess.run(cmd + [config("run", 6)], capture_output=True, text=True, timeout=240, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "preempted: checkpoint at step 6 saved" in first.stdout
    assert (tmp_path / "runs" / "run" / "checkpoints" / "step-00000006" / "meta.json").is_file()
    # model.kwargs.signal_at (the test's signal switch) differs from the preempted run's: opt in.
    second = subprocess.run(cmd + [config("run", 0), "--set", "checkpoint.allow_config_change=true"],
                            capture_output=True, text=True, timeout=240, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    reference = subprocess.run(cmd + [config("reference", 0)], capture_output=True, text=True,
                               timeout=240, env=env)
    assert reference.returncode == 0
    assert losses(tmp_path / "runs" / "run") == losses(tmp_path / "runs" / "reference")
