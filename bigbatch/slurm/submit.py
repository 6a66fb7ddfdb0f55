"""`bigbatch submit`: freeze the config into the run directory, render the job script, hand it to Slurm.

What lands in RUN_DIR (fixed here, at submission, so every requeue of the job resumes in it):

    submitted-config.yaml   the resolved config; the job, and every requeue of it, trains from this
                            file, so editing the original YAML later cannot change a running job
    job.sbatch              the rendered script (`sbatch job.sbatch` submits the same job again)
    slurm-<jobid>.out       the job's log, appended to across requeues (sbatch backend)
    submitit/               submitit's own files and logs (slurm.backend=submitit)

Nothing here prints; the CLI prints the job id and the log path.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bigbatch.config import Config, ConfigError
from bigbatch.slurm.render import (log_pattern, render_sbatch, run_dir_problems,
                                   sbatch_option_problems, sbatch_options)

SBATCH_TIMEOUT_S = 60
SCRIPT_NAME = "job.sbatch"
CONFIG_NAME = "submitted-config.yaml"


class SubmitError(RuntimeError):
    """Slurm refused the job, or could not be reached; the message says what to do."""


@dataclass(frozen=True)
class SubmitResult:
    job_id: str | None           # None for a dry run
    script_path: Path            # RUN_DIR/job.sbatch
    log_path: Path               # the job's log (RUN_DIR/slurm-%j.out on a dry run)
    test_only: str | None = None  # dry run: `sbatch --test-only`'s answer, when sbatch exists


def submit(cfg: Config, config_path: str | Path, overrides: list[str], dry_run: bool = False, *,
           python: str | None = None) -> SubmitResult:
    """Write RUN_DIR/submitted-config.yaml and RUN_DIR/job.sbatch, then submit (unless dry_run).

    A dry run writes the same files and, where `sbatch` exists, asks `sbatch --test-only` whether
    the cluster would accept the job (it schedules nothing). Raises ConfigError for an invalid
    slurm section and SubmitError when Slurm refuses or cannot be reached.
    """
    run_dir = Path(os.path.abspath(cfg.run_dir))
    problems = sbatch_option_problems(cfg.slurm) + run_dir_problems(run_dir)
    if problems:
        raise ConfigError(problems)
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = run_dir / CONFIG_NAME
    frozen.write_text(_frozen_config(cfg, config_path, overrides))
    python = python or sys.executable
    script = render_sbatch(cfg, config_path=frozen, overrides=[], run_dir=run_dir, python=python,
                           log_path=log_pattern(run_dir))
    script_path = run_dir / SCRIPT_NAME
    script_path.write_text(script)
    script_path.chmod(0o755)
    if dry_run:
        test = _sbatch(["--test-only", str(script_path)]) if shutil.which("sbatch") else None
        return SubmitResult(None, script_path, run_dir / "slurm-%j.out", test)
    if cfg.slurm.backend == "submitit":
        return _submit_with_submitit(cfg, run_dir, script_path, python)
    job_id = _sbatch(["--parsable", str(script_path)]).split(";")[0].strip()
    return SubmitResult(job_id, script_path, run_dir / f"slurm-{job_id}.out")


def _frozen_config(cfg: Config, config_path: str | Path, overrides: list[str]) -> str:
    command = " ".join(json.dumps(str(a)) for a in [config_path, *[f"--set={o}" for o in overrides]])
    return ("# Resolved by `bigbatch submit`; the job, and every requeue of it, trains from this file.\n"
            f"# submitted as: bigbatch submit {command}\n" + cfg.to_yaml())


def _sbatch(args: list[str]) -> str:
    """Run sbatch with a deadline; its answer (stdout, else stderr), or SubmitError."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found on PATH: submit from a Slurm login node, start a local "
                          "cluster with `scripts/slurm-local.sh start` (then export SLURM_CONF as it "
                          "prints), or check the script with --dry-run")
    try:
        done = subprocess.run(["sbatch", *args], capture_output=True, text=True,
                              timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sbatch did not answer within {SBATCH_TIMEOUT_S} s; is the controller "
                          "up? (`scontrol ping`; for the local cluster, is SLURM_CONF exported?)") from None
    answer = (done.stdout.strip() or done.stderr.strip())
    if done.returncode != 0:
        raise SubmitError(f"sbatch {' '.join(args[:-1])} refused the job (exit {done.returncode}): "
                          f"{done.stderr.strip() or done.stdout.strip()}")
    return answer


# ----------------------------------------------------------------------------- submitit backend

def run_job_script(script_path: str) -> int:
    """What submitit runs (in the batch step, no srun): the rendered script, as plain bash.

    Its #SBATCH lines are comments to bash; the allocation they describe was requested by submitit
    with the same options. The script's own srun starts the ranks exactly as with sbatch.
    """
    subprocess.run(["bash", script_path], check=True)
    return 0


def submitit_parameters(cfg: Config) -> dict:
    """SlurmExecutor.update_parameters(...) for the same allocation as job.sbatch."""
    options = dict(sbatch_options(cfg, log_path="unused"))
    for key in ("output", "open-mode"):  # submitit names and appends its own log files
        options.pop(key)
    # submitit's own keys (underscored) are overridden by additional_parameters of the same name.
    renamed = {"job-name": "job_name", "ntasks-per-node": "ntasks_per_node",
               "cpus-per-task": "cpus_per_task", "gpus-per-node": "gpus_per_node",
               "mail-user": "mail_user", "mail-type": "mail_type"}
    additional = {renamed.get(k, k): v for k, v in options.items()}
    return {"use_srun": False, "stderr_to_stdout": True, "additional_parameters": additional}


def _submit_with_submitit(cfg: Config, run_dir: Path, script_path: Path, python: str) -> SubmitResult:
    try:
        import submitit
    except ImportError:
        raise SubmitError("slurm.backend=submitit needs the submitit package: "
                          "pip install 'bigbatch[slurm]', or set slurm.backend=sbatch") from None
    executor = submitit.SlurmExecutor(folder=run_dir / "submitit", python=shlex.quote(python))
    executor.update_parameters(**submitit_parameters(cfg))
    try:
        job = executor.submit(run_job_script, str(script_path))
    except (subprocess.CalledProcessError, OSError) as err:
        raise SubmitError(f"submitit could not submit the job: {err}") from None
    return SubmitResult(str(job.job_id), script_path, Path(job.paths.stdout))
