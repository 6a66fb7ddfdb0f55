"""A resumed run says what it could not restore: torch's PowerSGD hook keeps its state outside our
checkpoints (a killed rank-2 run resumed with it differs from step 11 on), ours does not."""

from __future__ import annotations

from bigbatch.checkpoint.rundir import inexact_resume_warnings
from bigbatch.validate import load_config
from tests.conftest import tiny_config, write_config


def _warnings(tmp_path, method):
    raw = tiny_config(tmp_path, compression={"method": method})
    return inexact_resume_warnings(load_config(write_config(tmp_path / "c.yaml", raw)))


def test_torch_powersgd_resume_is_flagged_and_ours_is_not(tmp_path):
    [warning] = _warnings(tmp_path, "torch_powersgd")
    assert warning.startswith("warning: compression.method torch_powersgd:")
    assert "compression.method: powersgd resumes exactly" in warning
    assert _warnings(tmp_path, "powersgd") == []
    assert _warnings(tmp_path, "none") == []
