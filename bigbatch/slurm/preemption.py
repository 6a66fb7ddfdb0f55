"""Preemption and time-limit signals: note them, agree on them at a step boundary, requeue.

The flow the trainer wires up (one rank's view):

    handler = PreemptionHandler(preemption_signals(cfg.slurm.signal), rank=runtime.rank,
                                requeue=cfg.slurm.requeue).install()
    ...at each step boundary...
    if handler.agreed(all_reduce_max):   # every rank calls this (or ORs `requested` and
        checkpoint()                     #   `wants_requeue` into its own all-reduce)
        handler.after_checkpoint()       # only global rank 0 runs `scontrol requeue`, and only
        return                           #   for the time-limit signal; every rank exits 0

Ctrl-C (SIGINT) is handled like TERM: the first one stops the ranks together with a checkpoint
(the rank then exits 130, see `interrupted`); after it SIGINT gets its default action back, so a
second Ctrl-C ends the process at once. Not so in a rank of `bigbatch launch`: Slurm signals every
process of a job step, so `scancel --signal=INT` reaches such a rank twice, directly and forwarded by
the launcher, close together. There every SIGINT is the same stop request, and the launcher, which
receives each interrupt exactly once, counts them: its second one kills the ranks.

Only the time-limit signal (`slurm.signal`, USR1 by default) requeues. TERM is what `scancel` sends
as well as what preemption sends before killing, and the two cannot be told apart: so TERM
checkpoints and exits 0 without requeueing. A job preempted with Slurm's PreemptMode=REQUEUE is
requeued by Slurm itself and resumes from that checkpoint; a cancelled job stays cancelled.

A signal can arrive on one rank before another, or in the middle of a collective; so the handler
only sets a flag (no I/O, no torch calls, nothing that can deadlock or run twice), and the ranks act
together once the all-reduce of the flags says any of them saw one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Callable, Iterable, Mapping

import torch


DEFAULT_SIGNALS = ("USR1", "TERM")
REQUEUE_TIMEOUT_S = 60


def time_limit_signal(slurm_signal: str = "USR1@120") -> str:
    """The signal name of slurm.signal ('USR1@120', 'R:SIGUSR2@60' -> 'USR1', 'USR2')."""
    name = slurm_signal.split(":")[-1].split("@")[0]
    return name[3:] if name.startswith("SIG") else name


def preemption_signals(slurm_signal: str = "USR1@120") -> tuple[str, ...]:
    """The configured time-limit signal (slurm.signal, e.g. 'USR1@120') plus TERM (preemption)."""
    return tuple(dict.fromkeys((time_limit_signal(slurm_signal), "TERM")))


def _signum(name: str | int) -> int:
    if isinstance(name, int) or str(name).isdigit():
        return int(name)
    name = str(name)
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


class PreemptionHandler:
    """Remembers that a preemption or time-limit signal arrived; see the module doc for the flow."""

    def __init__(self, signals: Iterable[str | int] = DEFAULT_SIGNALS, *, rank: int = 0,
                 requeue: bool = True, log: Callable[[str], None] | None = None,
                 requeue_signals: Iterable[str | int] = ("USR1",), interrupt: bool = True,
                 second_interrupt_kills: bool = True):
        self.signals = tuple(_signum(s) for s in signals)
        self.requeue_signals = frozenset(_signum(s) for s in requeue_signals)
        self.rank, self.requeue, self.log = rank, requeue, log
        self.interrupt = interrupt  # also handle SIGINT (Ctrl-C)
        # False in a rank of `bigbatch launch`, whose launcher counts the Ctrl-Cs (bigbatch.training.run).
        self.second_interrupt_kills = second_interrupt_kills
        self.received: int | None = None  # the first signal number seen
        self.interrupted = False  # a Ctrl-C arrived (the rank exits 130 after its checkpoint)
        self.requeued = False
        self._previous: dict[int, object] = {}

    # -- signal side: only a flag -------------------------------------------------------------
    def _on_signal(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum

    def _on_interrupt(self, signum: int, frame: object) -> None:
        self.interrupted = True
        if self.second_interrupt_kills:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C kills at once
        self._on_signal(signum, frame)

    @property
    def requested(self) -> bool:
        """True once this process received one of the signals."""
        return self.received is not None

    @property
    def wants_requeue(self) -> bool:
        """True once this process received a signal that asks for a requeue (the time-limit one)."""
        return self.received in self.requeue_signals

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only, as Python requires); returns self."""
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        if self.interrupt and signal.SIGINT not in self._previous:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # -- step boundary: all ranks agree -------------------------------------------------------
    def agreed(self, all_reduce_max: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device | str = "cpu") -> bool:
        """True on every rank if any rank saw a signal. A collective: every rank must call it.

        `all_reduce_max` returns the element-wise max over ranks (identity in a single process);
        `device` is where the collective's tensor must live (cuda for NCCL).
        """
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce_max(flag).item() > 0)

    # -- after the checkpoint: requeue ----------------------------------------------------------
    def after_checkpoint(self, requeue_agreed: bool | None = None) -> bool:
        """Requeue (global rank 0, under Slurm, if `requeue`) when a requeue signal arrived:
        `requeue_agreed`, the OR of `wants_requeue` over the ranks, or this rank's own when None.
        True if Slurm accepted."""
        wanted = self.wants_requeue if requeue_agreed is None else requeue_agreed
        if self.requeue and wanted:
            self.requeued = self.requeue_job(rank=self.rank, log=self.log)
        elif self.log and self.rank == 0 and not wanted and not self.interrupted:
            self.log("stopped by TERM (scancel or preemption): checkpoint saved, not requeued")
        return self.requeued

    @staticmethod
    def job_id(env: Mapping[str, str] | None = None) -> str | None:
        """The id `scontrol requeue` needs: JOBID, or ARRAYJOBID_TASKID inside an array job."""
        env = os.environ if env is None else env
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return env.get("SLURM_JOB_ID") or None

    @classmethod
    def requeue_command(cls, env: Mapping[str, str] | None = None) -> list[str] | None:
        job = cls.job_id(env)
        return None if job is None else ["scontrol", "requeue", job]

    @classmethod
    def requeue_job(cls, env: Mapping[str, str] | None = None, *, rank: int = 0,
                    runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                    log: Callable[[str], None] | None = None) -> bool:
        """Ask Slurm to requeue this job; True if it accepted.

        Only global rank 0 requeues (other ranks return False at once), only under Slurm (no job
        id: False), and only after the checkpoint is committed: Slurm stops the job's processes
        right away and starts the same job id again later, with SLURM_RESTART_COUNT + 1.
        `log` receives the reason when Slurm refused or scontrol could not run.
        """
        log = log or (lambda message: None)
        command = cls.requeue_command(env)
        if rank != 0 or command is None:
            return False
        if runner is subprocess.run and shutil.which("scontrol") is None:
            log("cannot requeue: scontrol not found on PATH")
            return False
        try:
            done = runner(command, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            log(f"cannot requeue: {' '.join(command)}: {err}")
            return False
        if done.returncode != 0:
            log(f"cannot requeue: {' '.join(command)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout or '').strip()}")
        return done.returncode == 0

    @staticmethod
    def restart_count(env: Mapping[str, str] | None = None) -> int:
        """How many times Slurm restarted this job (0 on the first run or outside Slurm)."""
        env = os.environ if env is None else env
        return int(env.get("SLURM_RESTART_COUNT") or 0)
