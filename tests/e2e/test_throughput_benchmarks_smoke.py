"""Smoke tests of benchmarks/prefetch.py and benchmarks/compile.py --quick: every variant runs, the
table and the plot appear (timings are measurements, never asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def quick(script: str, tmp_path) -> dict[str, list[float]]:
    """The table rows of `script --quick`, by first column."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--quick",
                             "--out", str(tmp_path / "plot.png")], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "plot.png").stat().st_size > 0
    return {line.split()[0]: [float(v) for v in line.split()[1:]] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("cold", "warm", "mlp", "gpt")}


def test_prefetch_benchmark_quick(tmp_path):
    rows = quick("prefetch.py", tmp_path)
    assert set(rows) == {"cold", "warm"}
    for steps, off, on, ratio in rows.values():
        assert steps == 2 and off > 0 and on > 0 and ratio == pytest.approx(off / on, rel=0.1)  # ms printed to 0.1


@pytest.mark.slow  # compiles two models with inductor
def test_compile_benchmark_quick(tmp_path):
    rows = quick("compile.py", tmp_path)
    assert set(rows) == {"mlp", "gpt"}
    for steps, eager, compiled, ratio, compile_s in rows.values():
        assert steps == 2 and eager > 0 and compiled > 0 and compile_s > 0
        assert ratio == pytest.approx(compiled / eager, rel=0.1)  # ms to 0.1
