"""What the multi-rank benchmarks share: the emulated cluster of network namespaces
(`scripts/netns-cluster.sh`), one `python -m bigbatch train` process per rank, and their cleanup.

Every process started here is killed and reaped before `run_processes` returns, and `emulated_network`
removes every bb-* namespace however its block ends; `interruptible()` makes Ctrl-C and kill unwind
through those `finally`s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "scripts" / "netns-cluster.sh"
NETNS_RUN = REPO / "scripts" / "netns-run.sh"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_")


# --------------------------------------------------------------------------- the emulated cluster

def netns_problem() -> str | None:
    """Why the emulated cluster cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found; install iproute2"
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if listing.returncode != 0:
        return f"'ip netns list' failed: {listing.stderr.strip()}"
    ours = [line.split()[0] for line in listing.stdout.splitlines() if line.startswith("bb-")]
    if ours:
        return (f"bb-* namespaces already exist ({', '.join(ours)}): another run may be using them; "
                "if not, remove them with scripts/netns-cluster.sh down")
    return None


def cluster(*args: str) -> None:
    """`scripts/netns-cluster.sh ARGS...`; RuntimeError with its stderr when it fails."""
    result = subprocess.run([str(CLUSTER), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"netns-cluster.sh {' '.join(args)} failed:\n{result.stderr}")


@contextlib.contextmanager
def emulated_network(nodes: int | None = None, rate: str | None = None) -> Iterator[None]:
    """`nodes` namespaces at `rate` for the block (none brought up when rate is None: the caller
    does, or the ranks use loopback); every bb-* namespace is removed however the block ends."""
    if rate is None and nodes is not None:
        yield
        return
    try:
        if rate is not None:
            cluster("up", str(nodes), rate)
        yield
    finally:
        cluster("down")


# --------------------------------------------------------------------------- running ranks

def clean_env() -> dict[str, str]:
    """This process's environment without any launcher variables (a rank must not inherit ours)."""
    return {k: v for k, v in os.environ.items()
            if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}


def run_processes(commands: Sequence[list[str]], logs: Sequence[Path], timeout_s: float) -> float:
    """Run the commands together; their wall time. Fails if one fails or the deadline passes.
    Whatever happens (Ctrl-C included), every process started here is killed and reaped first."""
    procs: list[subprocess.Popen] = []
    started = time.perf_counter()
    try:
        for command, log in zip(commands, logs):
            with open(log, "w") as out:  # the child keeps its own copy of the descriptor
                procs.append(subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        print(f"    started pids {' '.join(str(p.pid) for p in procs)}", flush=True)
        wait_all(procs, logs, started + timeout_s)
        return time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:  # not reaped yet, so its process group id is still ours
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_all(procs: Sequence[subprocess.Popen], logs: Sequence[Path], deadline: float) -> None:
    """Poll until every process exited 0; RuntimeError with the log tail of one that did not."""
    while any(p.returncode is None for p in procs):
        for proc, log in zip(procs, logs):
            try:
                code = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            if code != 0:
                raise RuntimeError(f"rank exited with {code}; {log}:\n{log.read_text()[-3000:]}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"ranks still running at the deadline; see {logs[0].parent}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interruptible() -> None:
    """Ctrl-C and kill raise KeyboardInterrupt, so they unwind through the `finally`s above. SIGINT
    is set explicitly: a shell starting us in the background leaves it ignored, and Python then
    installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
