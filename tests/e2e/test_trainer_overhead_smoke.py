"""Smoke test of benchmarks/trainer_overhead.py --quick: both loops run and the table is printed
(the ratio is a measurement, never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_quick_run_prints_both_loops_and_a_ratio(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trainer_overhead.py"), "--quick"],
                            capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith(("bigbatch ", "hand DDP "))}
    assert set(rows) == {"bigbatch", "hand"}
    for name in ("bigbatch", "hand"):
        steps, *timings = rows[name][-3:]
        assert int(steps) == 2 * 5  # --quick: 2 pairs of 5 timed steps, warm-up steps left out
        assert all(float(v) > 0 for v in timings)
    ratio = re.search(r"ratio bigbatch / hand \(samples/s at the median step time\): ([0-9.]+)", result.stdout)
    assert ratio and float(ratio.group(1)) > 0
