"""`bigbatch launch`: start N ranks per node through torch.distributed.run (torchrun's engine).

Signals: torchrun starts every worker in its own session, so a Ctrl-C at the terminal reaches only
this launcher, and torchrun's own handlers would answer TERM/INT by terminating the workers and
calling that a failure. Instead the launcher forwards TERM, INT and USR1 to its workers and keeps
waiting: the ranks agree at the next step boundary, checkpoint and exit (0, or 130 for Ctrl-C).
Slurm signals every process of a step itself, so under Slurm a rank receives each signal twice
(directly and forwarded) and acts once; for SIGINT too, so the launcher, not the rank, counts
Ctrl-Cs: its second one kills the ranks at once (SIGKILL, which also ends a rank stuck in a
collective).

Exit code: 0 after a finished run or a graceful stop (TERM, USR1), 130 after Ctrl-C; otherwise the
first failing rank's exit code (1 if it died of a signal), with one line naming that rank, its exit
code and its error (bigbatch.launch.failure writes the traceback to a file the line names).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from bigbatch.exit_codes import BAD_INPUT, DIVERGED, FAILED, INTERRUPTED, OK
from bigbatch.launch.env import OMP_FROM_USER, cpu_share
from bigbatch.launch.failure import LAUNCHED, traceback_path

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Exit codes whose rank printed its own one-line reason (bigbatch.exit_codes).
NO_RECORD = {BAD_INPUT: "bad input (the rank's message is above)",
             DIVERGED: "training diverged (rank 0's summary is above)"}


def torchrun_args(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
                  bigbatch_args: list[str], max_restarts: int = 0) -> list[str]:
    """Arguments for torch.distributed.run that start `python -m bigbatch ARGS...` on every rank."""
    args = [f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")  # picks a free local port itself
    else:
        if rdzv_endpoint is None:
            raise ValueError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1")
        # Static: the node rank given (SLURM_NODEID in a job) is the group rank, so global ranks are
        # node-major as the dry run's rank map says; c10d would number nodes in order of arrival.
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={rdzv_endpoint}"]
    return args + _signals_to_handle() + ["-m", "bigbatch", *bigbatch_args]


def _signals_to_handle() -> list[str]:
    """Keep torchrun's handlers off TERM and INT: they would answer the first signal by sending it to
    the workers and SIGKILL them 30 s later, whatever their checkpoint. Newer torchrun takes an
    option (and overwrites TORCHELASTIC_SIGNALS_TO_HANDLE with it); older reads the variable."""
    defaults = vars(torch_run.get_args_parser().parse_args(["x"]))
    return ["--signals-to-handle=SIGHUP,SIGQUIT"] if "signals_to_handle" in defaults else []


def launch(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
           train_args: list[str]) -> int:
    """Run `bigbatch train` on every rank; the exit code (see the module doc)."""
    return run_module(nproc_per_node, ["train", *train_args], nnodes, node_rank, rdzv_endpoint)


def run_module(nproc_per_node: int, bigbatch_args: list[str], nnodes: int = 1, node_rank: int = 0,
               rdzv_endpoint: str | None = None) -> int:
    """`python -m bigbatch ARGS` on every rank. A failed rank makes torchrun stop the others."""
    args = torch_run.get_args_parser().parse_args(
        torchrun_args(nproc_per_node, nnodes, node_rank, rdzv_endpoint, bigbatch_args))
    prepare_worker_env(nproc_per_node)
    forwarder = SignalForwarder().install()
    _quiet_torchrun()
    try:
        torch_run.run(args)
    except ChildFailedError as err:
        return failure_exit_code(err.failures, forwarder.received)
    except SignalException as err:  # a signal before any rank started: nothing to save
        return stop_exit_code(forwarder.received or [err.sigval])
    except Exception as err:  # rendezvous and the like
        print(f"bigbatch launch: {type(err).__name__}: {err}", flush=True)
        return FAILED
    finally:
        forwarder.uninstall()
    return OK


def prepare_worker_env(nproc_per_node: int) -> None:
    """Tell the ranks they run under `bigbatch launch` and whether OMP_NUM_THREADS is the user's.

    Setting OMP_NUM_THREADS to the ranks' share of the cores keeps torchrun from forcing 1 (and from
    printing its banner); each rank recomputes its share from its own affinity anyway."""
    os.environ[LAUNCHED] = "1"
    os.environ[OMP_FROM_USER] = "1" if os.environ.get("OMP_NUM_THREADS") else "0"
    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(cpu_share(nproc_per_node))
    # torchrun must not install its TERM/INT handlers over ours: older versions read this when starting
    # workers, newer ones overwrite it with --signals-to-handle (see _signals_to_handle).
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"


def _quiet_torchrun() -> None:
    """torchrun logs a warning per worker it stops and an error per failure; we print one line."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


class SignalForwarder:
    """Passes TERM, INT and USR1 on to this process's children (the workers) and remembers them."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def install(self) -> "SignalForwarder":
        for signum in FORWARDED:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        # The ranks take every SIGINT as the same stop request (under Slurm each arrives twice):
        # the launcher's own second one is the one that ends them at once.
        forward = signal.SIGKILL if aborted(self.received) else signum
        workers = child_pids()
        for pid in workers:
            try:
                os.kill(pid, forward)
            except ProcessLookupError:  # exited meanwhile
                pass
        if workers and signum == signal.SIGINT and forward == signum:
            _say("bigbatch launch: interrupted: the ranks save a checkpoint at the next step and exit; "
                 "interrupt again to end them at once, without it")
        if not workers and signum != signal.SIGUSR1:
            # No worker yet (rendezvous): let torchrun's agent stop as it does on its own signals.
            raise SignalException(f"bigbatch launch got {signal.Signals(signum).name}",
                                  sigval=signal.Signals(signum))


def child_pids(parent: int | None = None) -> list[int]:
    """Live children of `parent` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _say(line: str) -> None:
    """One line from a signal handler: unbuffered, since print could re-enter a half-done write."""
    try:
        os.write(1, (line + "\n").encode())
    except OSError:
        pass


def aborted(received: list[int]) -> bool:
    """A second Ctrl-C reached the launcher: it ended the ranks without waiting for a checkpoint."""
    return received.count(signal.SIGINT) > 1


def stop_exit_code(received: list[int]) -> int:
    return INTERRUPTED if signal.SIGINT in received else OK


def failure_exit_code(failures: dict, received: list[int]) -> int:
    """Exit code after torchrun reported failed ranks; prints one line unless it was a stop we asked for."""
    if received and all(_stopped(f.exitcode, received) for f in failures.values()):
        if aborted(received) and any(f.exitcode < 0 for f in failures.values()):
            print("bigbatch launch: second Ctrl-C: ranks ended without waiting for a checkpoint", flush=True)
        return stop_exit_code(received)
    rank, first = min(failures.items(), key=lambda item: _failure_time(item[1]))
    print(f"bigbatch launch: rank {rank} failed ({_exit_text(first.exitcode)}): {_error_text(first)}",
          flush=True)
    return first.exitcode if first.exitcode > 0 else FAILED


def _stopped(exitcode: int, received: list[int]) -> bool:
    """An exit that a forwarded signal explains: 130 (Ctrl-C), killed by that signal, by the TERM
    torchrun sends the remaining workers once one has exited non-zero, or by a second Ctrl-C's KILL."""
    if exitcode == -signal.SIGKILL and aborted(received):
        return True
    return exitcode in (INTERRUPTED, -signal.SIGTERM) or -exitcode in received


def _failure_time(failure) -> int:
    info = failure.error_file_data.get("message", {})
    info = info.get("extraInfo", {}) if isinstance(info, dict) else {}
    # Without our nanoseconds, torchrun's whole seconds (noted when it saw the exit): end of that second.
    return int(info.get("timestamp_ns") or failure.timestamp * 10**9 + 10**9 - 1)


def _exit_text(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _error_text(failure) -> str:
    data = failure.error_file_data.get("message")
    if not isinstance(data, dict):  # no error file: killed, or a failure bigbatch reported itself
        return NO_RECORD.get(failure.exitcode, "no error recorded (see the rank's output above)")
    where = traceback_path(failure.error_file)
    return f"{data.get('message')} (traceback: {where})" if where.exists() else str(data.get("message"))
