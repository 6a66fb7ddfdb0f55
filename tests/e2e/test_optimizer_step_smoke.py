"""Smoke test of benchmarks/optimizer_step.py --quick: every variant steps, the native LAMB kernel
builds, the table and the plot come out (timings are measurements, never asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

NAMES = ["torch AdamW, fused", "torch AdamW, foreach", "torch SGD momentum, foreach", "LAMB default (C kernel)",
         "LAMB default, torch ops", "LAMB foreach", "LAMB loop", "LARS default", "LARS foreach", "LARS loop"]


def test_quick_run_prints_every_variant_and_a_plot(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "optimizer_step.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=240,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                                               "BIGBATCH_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "native LAMB kernel: fresh build" in result.stdout and "; loaded" in result.stdout
    rows = {}
    for line in result.stdout.splitlines():
        for name in NAMES:
            if line.startswith(name + " "):
                rows[name] = line[len(name):].split()
    assert list(rows) == NAMES
    assert rows["torch AdamW, fused"][1] == "1.00"  # the baseline of the ratio column
    assert all(float(v) > 0 for values in rows.values() for v in values)
    assert len(rows["LARS default"]) == 3  # LARS rows also give the ratio to SGD
    assert (tmp_path / "optimizer_step.png").stat().st_size > 0
