"""`mpirun -np 2 python -m bigbatch train`: ranks and rendezvous come from Open MPI's variables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_config, write_config
from tests.integration.slurm_cluster import metrics_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # may apt-get install first


@pytest.fixture(scope="module")
def mpirun() -> str:
    """Open MPI's mpirun; installed from Debian's openmpi-bin when missing and we are root."""
    if shutil.which("mpirun") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "install", "-y", "-qq", "openmpi-bin"], ["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "openmpi-bin"]):
            subprocess.run(command, env=env, capture_output=True, timeout=600)
            if shutil.which("mpirun"):
                break
    path = shutil.which("mpirun")
    if path is None:
        pytest.skip("mpirun not found and could not be installed: apt-get install openmpi-bin")
    return path


def run_mpi(mpirun: str, np: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO),
           # Open MPI refuses root unless told twice; harmless otherwise.
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)  # nothing but MPI's own variables may decide the ranks
    return subprocess.run([mpirun, "-np", str(np), "--oversubscribe", sys.executable, "-m", "bigbatch",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_mpirun_two_ranks_train(mpirun, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, run={"name": "mpi", "max_steps": 6}))
    done = run_mpi(mpirun, 2, "train", str(config))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "mpi: 2 rank(s)" in done.stdout  # world size 2, printed once by rank 0
    assert done.stdout.count("done: 6 steps") == 1
    assert [r["step"] for r in metrics_rows(tmp_path / "runs" / "mpi")] == list(range(1, 7))
