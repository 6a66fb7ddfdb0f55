"""Helpers for tests that need a real Slurm cluster: start/stop scripts/slurm-local.sh, poll job state."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "slurm-local.sh"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED")


def _free_port_block(count: int) -> int:
    """A base port such that base .. base+count-1 are all free on 127.0.0.1 right now."""
    for _ in range(50):
        base = random.randint(20000, 30000)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports found")


class LocalCluster:
    """A cluster of `nodes` virtual nodes under `state_dir`; `env` is what clients need."""

    def __init__(self, state_dir: Path, nodes: int):
        self.state_dir, self.nodes = state_dir, nodes
        self.env = {**os.environ, "BIGBATCH_SLURM_DIR": str(state_dir),
                    "BIGBATCH_SLURM_PORT": str(_free_port_block(nodes + 1)),
                    "SLURM_CONF": str(state_dir / "etc" / "slurm.conf")}

    def script(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)

    def job_field(self, job_id: str, name: str) -> str:
        """One field of `scontrol show job` (multi-line form, so values may contain spaces)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        found = re.search(rf"(?:^|\s){name}=(.*?)(?=\s+\w+=|$)", out, re.M)
        return found.group(1) if found else ""

    def wait_for_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        """Poll the job's state until it is one of `states` (or terminal); fail after `timeout` s."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states or state in TERMINAL:
                return state
            time.sleep(0.5)
        pytest.fail(f"job {job_id} still {state or 'unknown'} after {timeout} s; "
                    f"slurmctld log: {self.state_dir / 'log' / 'slurmctld.log'}")


def start_cluster(state_dir: Path, nodes: int) -> LocalCluster:
    """Start the cluster, or skip the module with the reason (not root, packages unavailable)."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmd and munged as root; run the tests as root")
    cluster = LocalCluster(state_dir, nodes)
    done = cluster.script("start", "--nodes", str(nodes))
    if done.returncode != 0:
        cluster.script("stop", timeout=120)
        if "apt-get install" in done.stderr or "missing packages" in done.stderr:
            pytest.skip(f"cannot install Slurm: {done.stderr.strip()[-500:]}")
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{done.stderr}")
    return cluster


def metrics_rows(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line, while the job is still writing it
            continue
    return [r for r in rows if r.get("kind", "train") == kind]
