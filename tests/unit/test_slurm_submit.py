"""submit(): the files it leaves in the run directory and how it talks to sbatch (a stub here)."""

from __future__ import annotations

import builtins
import json

import pytest

from bigbatch.config import ConfigError
from bigbatch.validate import load_config, validate_config
from bigbatch.slurm.submit import SubmitError, submit, submitit_parameters
from tests.conftest import tiny_config, write_config

SBATCH_STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$SBATCH_ARGV"
case "$1" in
  --parsable) echo "1234;bigbatch" ;;
  --test-only) echo "sbatch: Job 1235 to start at 2030-01-01T00:00:00 using 2 processors" >&2 ;;
esac
exit ${SBATCH_EXIT:-0}
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH_STUB)
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SBATCH_ARGV", str(tmp_path / "sbatch-argv"))
    return tmp_path / "sbatch-argv"


def loaded(tmp_path, **sections):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))
    return config, load_config(config, ["optim.lr=0.2"])


def test_submit_writes_the_frozen_config_and_script_then_calls_sbatch(tmp_path, fake_sbatch):
    config, cfg = loaded(tmp_path)
    result = submit(cfg, config, ["optim.lr=0.2"], dry_run=False)
    run_dir = tmp_path / "runs" / "tiny"
    assert result.job_id == "1234"
    assert result.script_path == run_dir / "job.sbatch"
    assert result.log_path == run_dir / "slurm-1234.out"
    assert fake_sbatch.read_text().split("\n")[:2] == ["--parsable", str(run_dir / "job.sbatch")]
    frozen = run_dir / "submitted-config.yaml"
    assert load_config(frozen).to_yaml() == cfg.to_yaml()  # the job trains from exactly this
    assert f"submitted as: bigbatch submit {json.dumps(str(config))} \"--set=optim.lr=0.2\"" in frozen.read_text()
    assert f"train {frozen} \\\n" in result.script_path.read_text()


def test_dry_run_asks_sbatch_test_only(tmp_path, fake_sbatch):
    config, cfg = loaded(tmp_path)
    result = submit(cfg, config, [], dry_run=True)
    assert result.job_id is None and result.script_path.is_file()
    assert result.log_path.name == "slurm-%j.out"
    assert "Job 1235 to start" in result.test_only
    assert fake_sbatch.read_text().startswith("--test-only\n")


def test_dry_run_without_sbatch_only_renders(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    config, cfg = loaded(tmp_path)
    result = submit(cfg, config, [], dry_run=True)
    assert result.test_only is None and result.script_path.read_text().startswith("#!/bin/bash")


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    config, cfg = loaded(tmp_path)
    with pytest.raises(SubmitError, match="sbatch not found on PATH.*slurm-local.sh start"):
        submit(cfg, config, [], dry_run=False)


def test_refused_job_carries_sbatchs_message(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.setenv("SBATCH_EXIT", "1")
    config, cfg = loaded(tmp_path)
    with pytest.raises(SubmitError, match="refused the job \\(exit 1\\)"):
        submit(cfg, config, [], dry_run=False)


def test_invalid_slurm_section_is_a_config_error_before_anything_is_written(tmp_path, fake_sbatch):
    # The slurm section is validated with the rest of the config, before submit can start.
    with pytest.raises(ConfigError, match="slurm.extra.bogus"):
        loaded(tmp_path, slurm={"extra": {"bogus": 1}})
    assert not (tmp_path / "runs").exists() and not fake_sbatch.exists()


def test_submitit_backend_without_submitit_names_the_key(tmp_path, fake_sbatch, monkeypatch):
    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    config, cfg = loaded(tmp_path, slurm={"backend": "submitit", "time": "00:10:00"})
    with pytest.raises(SubmitError, match="slurm.backend=submitit needs the submitit package"):
        submit(cfg, config, [], dry_run=False)


def test_submitit_gets_the_same_allocation(tmp_path):
    cfg = validate_config(tiny_config(tmp_path, slurm={
        "backend": "submitit", "time": "01:00:00", "nodes": 2, "ntasks_per_node": 2,
        "partition": "gpu", "extra": {"reservation": "r"}}))
    params = submitit_parameters(cfg)
    assert params["use_srun"] is False  # submitit's process runs job.sbatch, whose srun starts ranks
    assert params["additional_parameters"] == {
        "job_name": "tiny", "partition": "gpu", "nodes": 2, "ntasks_per_node": 2, "time": "01:00:00",
        "signal": "USR1@120", "requeue": True, "reservation": "r"}
