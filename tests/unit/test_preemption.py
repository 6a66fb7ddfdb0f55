"""PreemptionHandler: a signal only sets a flag; ranks agree by a max; rank 0 builds the requeue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from bigbatch.slurm.preemption import PreemptionHandler, preemption_signals, time_limit_signal


def test_signal_only_sets_the_flag():
    handler = PreemptionHandler()
    previous = signal.getsignal(signal.SIGUSR1)
    with handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler before the next bytecode
        assert handler.requested and handler.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # the process is still alive: TERM is a flag too
        assert handler.received == signal.SIGUSR1  # the first signal is the one kept
    assert signal.getsignal(signal.SIGUSR1) is previous  # uninstalled on exit


def test_agreement_is_the_max_over_ranks():
    quiet, signalled = PreemptionHandler(), PreemptionHandler()
    signalled.received = signal.SIGUSR1
    flags = []

    def fake_all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
        # Stands in for a 2-rank all-reduce(MAX): this rank's flag against the other rank's.
        flags.append(tensor.item())
        return torch.maximum(tensor, torch.tensor([1.0]))

    assert quiet.agreed(fake_all_reduce_max)  # another rank saw the signal
    assert flags == [0.0]
    assert signalled.agreed(lambda t: t)      # single process: identity
    assert not quiet.agreed(lambda t: t)


class Recorder:
    def __init__(self, returncode: int = 0):
        self.calls, self.returncode = [], returncode

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        assert kwargs["timeout"] > 0
        return subprocess.CompletedProcess(argv, self.returncode, "", "error: Job is pending")


def test_requeue_runs_scontrol_requeue_with_the_job_id():
    runner = Recorder()
    assert PreemptionHandler.requeue_job({"SLURM_JOB_ID": "77"}, runner=runner)
    assert runner.calls == [["scontrol", "requeue", "77"]]


def test_array_job_is_requeued_as_arrayid_taskid():
    runner = Recorder()
    env = {"SLURM_JOB_ID": "81", "SLURM_ARRAY_JOB_ID": "80", "SLURM_ARRAY_TASK_ID": "1"}
    assert PreemptionHandler.requeue_job(env, runner=runner)
    assert runner.calls == [["scontrol", "requeue", "80_1"]]


def test_only_rank_zero_under_slurm_requeues():
    runner = Recorder()
    assert not PreemptionHandler.requeue_job({"SLURM_JOB_ID": "77"}, rank=1, runner=runner)
    assert not PreemptionHandler.requeue_job({}, runner=runner)  # not a Slurm job
    assert runner.calls == []


def test_refused_requeue_returns_false_and_says_why():
    messages = []
    assert not PreemptionHandler.requeue_job({"SLURM_JOB_ID": "5"}, runner=Recorder(1),
                                             log=messages.append)
    assert messages == ["cannot requeue: scontrol requeue 5 exited 1: error: Job is pending"]


def test_restart_count():
    assert PreemptionHandler.restart_count({}) == 0
    assert PreemptionHandler.restart_count({"SLURM_RESTART_COUNT": "2"}) == 2


@pytest.mark.parametrize("spec,expected", [("USR1@120", ("USR1", "TERM")), ("SIGUSR2@60", ("USR2", "TERM")),
                                           ("TERM@30", ("TERM",)), ("R:USR1", ("USR1", "TERM"))])
def test_preemption_signals_follow_slurm_signal(spec, expected):
    assert preemption_signals(spec) == expected
    PreemptionHandler(expected)  # every name resolves to a signal number


def test_after_checkpoint_requeues_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(PreemptionHandler, "requeue_job",
                        classmethod(lambda cls, env=None, *, rank=0, runner=None, log=None:
                                    calls.append(rank) or True))
    assert PreemptionHandler(rank=0).after_checkpoint(requeue_agreed=True)
    assert not PreemptionHandler(rank=0, requeue=False).after_checkpoint(requeue_agreed=True)
    assert calls == [0]


def test_only_the_time_limit_signal_requeues(monkeypatch):
    # TERM is also what scancel sends: requeueing on it would make a job impossible to cancel.
    monkeypatch.setattr(PreemptionHandler, "requeue_job",
                        classmethod(lambda cls, env=None, *, rank=0, runner=None, log=None: True))
    for received, requeued in ((signal.SIGUSR1, True), (signal.SIGTERM, False)):
        handler = PreemptionHandler(["USR1", "TERM"], requeue_signals=["USR1"])
        handler._on_signal(received, None)
        assert handler.requested and handler.wants_requeue == requeued
        assert handler.after_checkpoint() == requeued
    other = PreemptionHandler(["USR2", "TERM"], requeue_signals=["USR2"])
    other._on_signal(signal.SIGUSR2, None)
    assert other.wants_requeue


def test_time_limit_signal_is_the_name_in_slurm_signal():
    assert [time_limit_signal(s) for s in ("USR1@120", "R:SIGUSR2@60", "TERM")] == ["USR1", "USR2", "TERM"]


def test_installed_reflects_install_and_uninstall():
    handler = PreemptionHandler(["USR2"])
    assert not handler.installed
    with handler:
        assert handler.installed
    assert not handler.installed


def test_first_ctrl_c_is_a_stop_request_and_gives_sigint_its_default_action_back():
    previous = signal.getsignal(signal.SIGINT)
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only a flag
        assert handler.requested and handler.interrupted and handler.received == signal.SIGINT
        assert not handler.wants_requeue
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second Ctrl-C ends the process
    assert signal.getsignal(signal.SIGINT) is previous


def test_second_ctrl_c_ends_the_process_at_once_without_a_traceback():
    script = ("import os, signal\n"
              "from bigbatch.slurm.preemption import PreemptionHandler\n"
              "handler = PreemptionHandler().install()\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "print('first: stop requested', handler.interrupted, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"
              "print('still alive', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGINT
    assert done.stdout == "first: stop requested True\n"
    assert "Traceback" not in done.stderr


def test_after_checkpoint_says_nothing_about_term_after_ctrl_c():
    messages = []
    handler = PreemptionHandler(log=messages.append)
    handler.interrupted = True
    handler._on_signal(signal.SIGINT, None)
    assert not handler.after_checkpoint() and messages == []


def test_a_rank_of_bigbatch_launch_takes_every_sigint_as_the_same_stop_request():
    # Under Slurm such a rank receives one `scancel --signal=INT` twice (directly and from the
    # launcher); the launcher counts Ctrl-Cs instead and KILLs the ranks on its second.
    # (bigbatch.training.run passes second_interrupt_kills=not launched_rank().)
    with PreemptionHandler(second_interrupt_kills=False) as handler:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # would end this test process if SIGINT were SIG_DFL
        assert handler.interrupted and handler.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == handler._on_interrupt
    assert PreemptionHandler().second_interrupt_kills  # a terminal's `bigbatch train`, or an srun task
