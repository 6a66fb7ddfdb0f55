"""`bigbatch submit` on a real Slurm cluster: two virtual nodes on 127.0.0.1 (scripts/slurm-local.sh).

The module starts its own cluster (state in a temporary folder, ports picked free) and stops it at
the end. Jobs are tiny synthetic runs; every wait polls the job state against a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from bigbatch.validate import validate_config
from bigbatch.slurm.submit import submit
from tests.conftest import REPO, tiny_config
from tests.integration.slurm_cluster import metrics_rows, start_cluster

# A fresh machine installs Slurm (apt-get) inside the first test's fixture: allow for it.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

JOB_TIMEOUT = 240  # seconds from submission to a finished job (each rank imports torch: ~10 s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]  # submit() runs sbatch with our environment
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        cluster.script("stop", timeout=120)


def job_config(tmp_path, name, *, nodes=1, ntasks_per_node=2, launch_mode="srun", max_steps=10, **sections):
    slurm = {"nodes": nodes, "ntasks_per_node": ntasks_per_node, "launch_mode": launch_mode,
             "time": "00:10:00", **sections.pop("slurm", {})}
    raw = tiny_config(tmp_path, run={"name": name, "max_steps": max_steps}, slurm=slurm, **sections)
    return validate_config(raw)


def submit_job(cluster, tmp_path, cfg):
    result = submit(cfg, tmp_path / "unused.yaml", [], dry_run=False)
    assert result.job_id and result.job_id.isdigit()
    return result


def finished(cluster, result):
    state = cluster.wait_for_state(result.job_id, ("COMPLETED",), JOB_TIMEOUT)
    log = result.log_path.read_text() if result.log_path.exists() else "(no log)"
    assert state == "COMPLETED", f"job {result.job_id} ended {state}; its log:\n{log[-4000:]}"
    return log


def test_two_task_job_trains_to_completion(cluster, tmp_path):
    cfg = job_config(tmp_path, "two-tasks")
    result = submit_job(cluster, tmp_path, cfg)
    log = finished(cluster, result)
    assert "two-tasks: 2 rank(s)" in log
    assert [r["step"] for r in metrics_rows(cfg.run_dir)] == list(range(1, 11))
    assert (cfg.run_dir / "submitted-config.yaml").is_file() and result.script_path.is_file()


def test_two_nodes_with_torchrun_rendezvous_on_the_node_address(cluster, tmp_path):
    # n1 and n2 do not resolve: the rendezvous works only through NodeAddr (127.0.0.1).
    cfg = job_config(tmp_path, "two-nodes", nodes=2, ntasks_per_node=1, launch_mode="torchrun")
    result = submit_job(cluster, tmp_path, cfg)
    log = finished(cluster, result)
    assert "on n[1-2], rendezvous 127.0.0.1:" in log
    assert "two-nodes: 2 rank(s)" in log
    assert [r["step"] for r in metrics_rows(cfg.run_dir)] == list(range(1, 11))


def test_two_nodes_with_one_srun_task_each(cluster, tmp_path):
    cfg = job_config(tmp_path, "two-srun-nodes", nodes=2, ntasks_per_node=1)
    log = finished(cluster, submit_job(cluster, tmp_path, cfg))
    assert "two-srun-nodes: 2 rank(s)" in log


def test_submitit_backend_runs_the_same_job(cluster, tmp_path):
    pytest.importorskip("submitit", reason="pip install 'bigbatch[slurm]' for slurm.backend=submitit")
    cfg = job_config(tmp_path, "via-submitit", slurm={"backend": "submitit"})
    result = submit_job(cluster, tmp_path, cfg)
    assert result.log_path.parent == cfg.run_dir.absolute() / "submitit"
    log = finished(cluster, result)
    assert "via-submitit: 2 rank(s)" in log
    assert [r["step"] for r in metrics_rows(cfg.run_dir)] == list(range(1, 11))


class ReportingMLP(torch.nn.Module):
    """Each rank writes where it runs (Slurm node, local rank, global rank) at its first forward."""

    def __init__(self, d_in: int, classes: int, report_dir: str):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d_in, classes))
        self.report_dir, self.reported = report_dir, False

    def forward(self, x):
        if not self.reported:
            self.reported = True
            report = {k: int(os.environ[k]) for k in ("SLURM_NODEID", "LOCAL_RANK", "RANK",
                                                      "LOCAL_WORLD_SIZE", "WORLD_SIZE")}
            Path(self.report_dir, f"rank{report['RANK']}.json").write_text(json.dumps(report))
        return self.net(x)


@pytest.mark.parametrize("launch_mode", ["srun", "torchrun"])
def test_two_nodes_of_two_ranks_know_their_place(cluster, tmp_path, launch_mode):
    # ntasks_per_node=2 here stands for gpus_per_node=2 (no GPUs on this machine); the rank map the
    # dry run prints is node-major: node n, local rank l is rank 2n + l.
    reports = tmp_path / "reports"
    reports.mkdir()
    model = {"name": "tests.integration.test_slurm_cluster:ReportingMLP",
             "kwargs": {"d_in": 8, "classes": 3, "report_dir": str(reports)}}
    cfg = job_config(tmp_path, f"shape-{launch_mode}", nodes=2, ntasks_per_node=2, launch_mode=launch_mode,
                     max_steps=2, model=model, slurm={"env": {"PYTHONPATH": str(REPO)}})
    log = finished(cluster, submit_job(cluster, tmp_path, cfg))
    assert f"shape-{launch_mode}: 4 rank(s)" in log
    found = sorted(tuple(json.loads(p.read_text()).values()) for p in reports.glob("rank*.json"))
    assert found == [(node, local, 2 * node + local, 2, 4) for node in (0, 1) for local in (0, 1)]


HOSTILE = "a'; echo pwned; $(touch subst) `touch tick` \"q\" %j #x"  # no backslash: see run_dir_problems


def test_hostile_values_survive_sbatch_and_the_job_trains(cluster, tmp_path):
    # The unit tests transcribe sbatch's #SBATCH parser; this checks the real one agrees, and that
    # the run directory (with a `%j` sbatch must not expand) arrives intact in the job.
    hostile = HOSTILE + " \\"  # a backslash is fine everywhere but in the run directory
    cfg = job_config(tmp_path, HOSTILE, slurm={"job_name": hostile, "extra": {"comment": hostile,
                                                                              "hold": True}})
    result = submit_job(cluster, tmp_path, cfg)
    try:
        name = cluster.run("squeue", "-h", "-j", result.job_id, "-o", "%j").stdout.rstrip("\n")
        comment = cluster.run("squeue", "-h", "-j", result.job_id, "-o", "%k").stdout.rstrip("\n")
        assert name == hostile and comment == hostile
        assert cluster.run("scontrol", "release", result.job_id).returncode == 0
    except BaseException:
        cluster.run("scancel", result.job_id)
        raise
    log = finished(cluster, result)  # the log is at RUN_DIR/slurm-<id>.out, %j and all
    assert "pwned" not in log.replace(HOSTILE, "")
    assert [r["step"] for r in metrics_rows(cfg.run_dir)] == list(range(1, 11))
    assert not any((tmp_path / m).exists() for m in ("subst", "tick"))


def test_dry_run_is_checked_by_sbatch_test_only(cluster, tmp_path):
    cfg = job_config(tmp_path, "dry")
    result = submit(cfg, tmp_path / "unused.yaml", [], dry_run=True)
    assert result.job_id is None and "to start at" in result.test_only


# ----------------------------------------------------------------------------- preemption

PREEMPT_STEPS = 600  # long enough that the signal lands mid-run (5-50 ms a step here)


@pytest.mark.parametrize("launch_mode,nodes,ntasks_per_node", [
    ("srun", 1, 2),
    ("torchrun", 2, 1),
])
def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path, launch_mode,
                                                                nodes, ntasks_per_node):
    shape = {"nodes": nodes, "ntasks_per_node": ntasks_per_node, "launch_mode": launch_mode,
             "max_steps": PREEMPT_STEPS}
    reference = job_config(tmp_path / "ref", "reference", **shape)
    preempted = job_config(tmp_path / "pre", "preempted", **shape)
    ref_job = submit_job(cluster, tmp_path, reference)
    job = submit_job(cluster, tmp_path, preempted)

    wait_for_step(cluster, job, preempted.run_dir, 20)
    signalled = cluster.run("scancel", "--signal=USR1", job.job_id)
    assert signalled.returncode == 0, signalled.stderr
    log = finished(cluster, job)  # checkpoint, requeue (~11 s with cred_expire=10), resume, finish
    assert "(restart 0)" in log and "(restart 1)" in log
    # srun reports a task killed by the signal (e.g. a torchrun agent without a USR1 handler); that
    # it still worked would be a race between the dying step and the checkpoint.
    assert not re.search(r"task \d+: User defined signal 1", log)
    assert cluster.job_field(job.job_id, "Restarts") == "1"
    finished(cluster, ref_job)

    def losses(run_dir):  # the last row per step: a resumed run may log a step again
        return {r["step"]: r["loss"] for r in metrics_rows(run_dir)}

    resumed, uninterrupted = losses(preempted.run_dir), losses(reference.run_dir)
    assert sorted(resumed) == list(range(1, PREEMPT_STEPS + 1))
    assert resumed == uninterrupted  # exact: deterministic CPU training resumes bitwise


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tmp_path):
    # A run far longer than its 2-minute limit: Slurm sends USR1 once 90 s or less are left (its
    # time-limit check runs about every 30 s, so 30-60 s after the start); the run must checkpoint,
    # requeue itself and resume from that checkpoint. The resumed job is then cancelled.
    cfg = job_config(tmp_path, "timelimit", nodes=1, ntasks_per_node=2, max_steps=10**7,
                     slurm={"time": "00:02:00", "signal": "USR1@90"})
    job = submit_job(cluster, tmp_path, cfg)
    deadline = time.monotonic() + JOB_TIMEOUT
    log = ""
    while time.monotonic() < deadline and "resumed from" not in log:  # (states flicker while requeued)
        log = job.log_path.read_text() if job.log_path.exists() else ""
        time.sleep(0.5)
    cluster.run("scancel", job.job_id)  # TERM: checkpoint, no requeue, so the job stays cancelled
    assert "resumed from" in log, f"no resume within {JOB_TIMEOUT} s:\n{log[-3000:]}"
    saved = re.search(r"preempted: checkpoint at step (\d+) saved; job requeued", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert f"resumed from {cfg.run_dir / 'checkpoints' / f'step-{step:08d}'}" in log
    assert cluster.job_field(job.job_id, "Restarts") == "1"
    cluster.wait_for_state(job.job_id, ("CANCELLED",), 60)


def test_scancel_signal_int_in_torchrun_mode_checkpoints_and_exits_130(cluster, tmp_path):
    # slurmstepd signals every process of the step: each rank gets this SIGINT directly and again
    # from `bigbatch launch`. Before the fix the second one killed the ranks: exit 130, no checkpoint.
    cfg = job_config(tmp_path, "interrupted", nodes=1, ntasks_per_node=2, launch_mode="torchrun",
                     max_steps=PREEMPT_STEPS)
    job = submit_job(cluster, tmp_path, cfg)
    wait_for_step(cluster, job, cfg.run_dir, 20)
    signalled = cluster.run("scancel", "--signal=INT", job.job_id)
    assert signalled.returncode == 0, signalled.stderr
    state = cluster.wait_for_state(job.job_id, ("FAILED",), JOB_TIMEOUT)  # a non-zero exit: 130
    log = job.log_path.read_text()
    saved = re.search(r"interrupted \(Ctrl-C\): checkpoint at step (\d+) saved", log)
    assert state == "FAILED" and saved, log[-3000:]
    assert (cfg.run_dir / "checkpoints" / f"step-{int(saved.group(1)):08d}" / "meta.json").is_file()
    assert cluster.job_field(job.job_id, "ExitCode") == "130:0"
    assert "second Ctrl-C" not in log


def wait_for_step(cluster, job, run_dir, step, timeout=JOB_TIMEOUT):
    """Poll metrics.jsonl until the run reached `step` (it must still be running then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = metrics_rows(run_dir)
        if rows and rows[-1]["step"] >= step:
            assert rows[-1]["step"] < PREEMPT_STEPS // 2, "the run was too fast to interrupt"
            return
        if cluster.job_field(job.job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            pytest.fail(f"job {job.job_id} ended before step {step}: {job.log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"job {job.job_id} did not reach step {step} within {timeout} s")


# ----------------------------------------------------------------------------- MPI inside Slurm

@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun absent: apt-get install openmpi-bin")
def test_mpirun_inside_a_slurm_job(cluster, tmp_path):
    # On a real cluster mpirun starts the ranks of its own node as its children, in the batch step:
    # they inherit SLURM_PROCID=0 and SLURM_NTASKS=2, and only OMPI_COMM_WORLD_RANK tells them apart.
    # Here node n1 is not this host's name, so mpirun would start them through an srun'd orted
    # instead (SLURM_NTASKS=1, hiding the problem); `ras ^slurm, plm isolated` makes it a real one.
    cfg = job_config(tmp_path, "mpi-in-slurm")
    config = tmp_path / "c.yaml"
    config.write_text(cfg.to_yaml())
    log = tmp_path / "mpi.log"
    command = (f"export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; "
               f"mpirun --mca ras ^slurm --mca plm isolated --oversubscribe -np 2 "
               f"{sys.executable} -m bigbatch train {config}")
    done = cluster.run("sbatch", "--parsable", "--nodes=1", "--ntasks=2", f"--output={log}", "--wrap", command)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    state = cluster.wait_for_state(job_id, ("COMPLETED",), JOB_TIMEOUT)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", text[-3000:]
    assert "mpi-in-slurm: 2 rank(s)" in text
