"""Smoke test: `benchmarks/remat.py --quick` prints both tables and writes its plot (no timing checks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quick_benchmark_prints_tables_and_writes_png(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "remat.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["policy", "saved"] for line in lines), result.stdout
    for policy in ("none", "full", "every_k", "selective"):
        assert any(line.split()[:1] == [policy] for line in lines), policy
    header = next(line.split() for line in lines if line.split()[:2] == ["ranks", "strategy"])
    assert header[5] == "measured"
    rows = {tuple(line.split()[:2]): line.split() for line in lines if line.split()[:1] in (["2"], ["4"])}
    for world in ("2", "4"):
        planner, measured = (float(rows[(world, "zero1")][i]) for i in (6, 8))  # KiB values
        assert abs(measured - planner) / planner < 0.05  # measured on real ranks, ~planner's shard
    png = (tmp_path / "remat.png").read_bytes()
    assert png.startswith(b"\x89PNG")
