"""Who am I? Rank, world size and rendezvous address from torchrun, Slurm (srun) or MPI env vars.

Precedence: explicit torchrun-style variables (RANK/WORLD_SIZE, set by torchrun or by the user) win;
then Open MPI / PMI (mpirun inside an sbatch job also sees the batch step's Slurm variables); then
Slurm's SLURM_PROCID/SLURM_NTASKS. Values already in the environment are
never overwritten: `export_env` only fills in the variables that are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

from bigbatch.slurm.hostlist import expand_hostlist, expand_tasks_per_node


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "single" | "torchrun" | "slurm" | "mpi"


DEFAULT_PORT = 29500
# Set by `bigbatch launch` for its ranks: "1" if the user exported OMP_NUM_THREADS, "0" if the
# launcher set it (to the share below, which also keeps torchrun from forcing 1 and printing a banner).
OMP_FROM_USER = "BIGBATCH_OMP_NUM_THREADS_FROM_USER"


def cpu_share(ranks_on_node: int) -> int:
    """This process's cores divided between the ranks of its node (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, ranks_on_node))


def user_threads(env: dict[str, str] | None = None) -> int | None:
    """OMP_NUM_THREADS when the user set it (not a launcher), else None."""
    env = os.environ if env is None else env
    value = env.get("OMP_NUM_THREADS")
    if not value or env.get(OMP_FROM_USER) == "0":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"OMP_NUM_THREADS={value!r}: not a positive whole number of threads; "
                         "unset it or export e.g. OMP_NUM_THREADS=4")
    return int(value)


def detect(env: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables from `env` (default os.environ) without changing anything."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    # mpirun inside a Slurm job: its ranks inherit the batch step's SLURM_PROCID=0/SLURM_NTASKS, so
    # the MPI launcher's own variables must win.
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return _from_mpi(env)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return _from_slurm(env)
    return DistEnv(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT", DEFAULT_PORT)), "single")


def _from_torchrun(env: dict[str, str]) -> DistEnv:
    world = int(env["WORLD_SIZE"])
    return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", world)), env.get("MASTER_ADDR", "127.0.0.1"),
                   int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")


def _from_slurm(env: dict[str, str]) -> DistEnv:
    refuse_heterogeneous_job(env)
    world = int(env["SLURM_NTASKS"])
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    addr = env.get("MASTER_ADDR") or head_node_address(nodelist)
    # A job-specific port lets two jobs share a node without colliding.
    port = int(env.get("MASTER_PORT") or 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return DistEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                   slurm_local_world_size(env, world), addr, port, "slurm")


def slurm_local_world_size(env: dict[str, str], world: int) -> int:
    """This node's task count: SLURM_STEP_TASKS_PER_NODE (e.g. '3(x2),2') at SLURM_NODEID."""
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not tasks:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        return max(1, world // nodes)
    counts = expand_tasks_per_node(tasks)
    node = int(env.get("SLURM_NODEID", 0))
    if node >= len(counts):
        raise ValueError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={tasks!r} lists "
                         f"{len(counts)} node(s); is this a job step of another job?")
    return counts[node]


_HET_COMPONENT = re.compile(r"_(HET|PACK)_GROUP_[1-9][0-9]*$")


def refuse_heterogeneous_job(env: dict[str, str]) -> None:
    """A heterogeneous job's components have their own node and task lists; one process group over
    them is not supported, so say so rather than compute wrong ranks."""
    # Slurm sets *_PACK_GROUP_0 / *_HET_GROUP_0 in ordinary jobs too; a second component is the sign.
    het = sorted(k for k in env if k in ("SLURM_HET_SIZE", "SLURM_PACK_SIZE")
                 or (k.startswith("SLURM_") and _HET_COMPONENT.search(k)))
    if het:
        raise ValueError(f"heterogeneous Slurm job ({het[0]} is set): bigbatch runs one homogeneous "
                         "job step; submit the job without hetjob components (no ':' in sbatch/srun, "
                         "no '#SBATCH hetjob')")


def _from_mpi(env: dict[str, str]) -> DistEnv:
    rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0)))
    world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1)))
    local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", rank)))
    local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("MPI_LOCALNRANKS", world)))
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr is None or port is None:
        addr, port = _mpi_broadcast_address(addr, port, rank, world, local_world)
    return DistEnv(rank, world, local_rank, local_world, addr, int(port), "mpi")


def _mpi_broadcast_address(addr: str | None, port: str | None, rank: int, world: int,
                           local_world: int) -> tuple[str, str]:
    """Rank 0 picks its address and a free port; mpi4py broadcasts them to every rank."""
    try:
        from mpi4py import MPI
    except ImportError:
        if local_world == world:  # all ranks on this node: loopback works
            return addr or "127.0.0.1", port or str(DEFAULT_PORT)
        raise RuntimeError("multi-node mpirun without MASTER_ADDR/MASTER_PORT needs mpi4py: "
                           "pip install 'bigbatch[mpi]' or export MASTER_ADDR and MASTER_PORT") from None
    mine = None
    if rank == 0:
        host = "127.0.0.1" if local_world == world else socket.gethostbyname(socket.gethostname())
        mine = (addr or host, port or str(_free_port()))
    return MPI.COMM_WORLD.bcast(mine, root=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'n[3-5,9],m1' -> 'n3'; 'rack[1-2]-node[01-04]' -> 'rack1-node01'."""
    hosts = expand_hostlist(nodelist)
    if not hosts:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return hosts[0]


def head_node_address(nodelist: str) -> str:
    """The head node's NodeAddr from scontrol (works where node names don't resolve), else its name."""
    host = first_host(nodelist)
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True,
                                 timeout=20).stdout
        except (subprocess.TimeoutExpired, OSError):
            out = ""
        found = re.search(r"NodeAddr=(\S+)", out)
        if found:
            return found.group(1)
    return host


def export_env(info: DistEnv) -> None:
    """Fill in the variables torch's env:// rendezvous reads; never overwrite ones already set."""
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size),
                       ("LOCAL_RANK", info.local_rank), ("LOCAL_WORLD_SIZE", info.local_world_size),
                       ("MASTER_ADDR", info.master_addr), ("MASTER_PORT", info.master_port)):
        os.environ.setdefault(key, str(value))
