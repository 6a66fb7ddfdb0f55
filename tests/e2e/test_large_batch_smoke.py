"""Smoke test of benchmarks/large_batch.py: `--quick` trains every row briefly and writes table, CSV, PNG."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_fashion_mnist

pytestmark = [pytest.mark.e2e, needs_fashion_mnist]

ROWS = ("baseline", "sgd-linear", "sgd-sqrt", "lars", "lamb")
BATCHES = {"baseline": 256, "sgd-linear": 8192, "sgd-sqrt": 8192, "lars": 8192, "lamb": 8192}
QUICK_SAMPLES = 512  # --quick's sample budget per row


def test_quick_run_prints_every_row_and_writes_png_and_csv(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "large_batch.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("row") and "steps to 0.85" in line)
    table = [line.split() for line in lines[header + 2:header + 2 + len(ROWS)]]
    assert [cells[0] for cells in table] == list(ROWS)
    for cells in table:
        # columns: row, epochs, batch, optimizer, peak lr, steps, ...; the trainer stops once the
        # sample budget is reached, so a row takes ceil(512 / batch) steps
        assert int(cells[2]) == BATCHES[cells[0]]
        assert int(cells[5]) == math.ceil(QUICK_SAMPLES / BATCHES[cells[0]])
    png = tmp_path / "large_batch.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "large_batch.csv") as fh:
        records = list(csv.DictReader(fh))
    assert [r["row"] for r in records] == list(ROWS)
    assert all(0.0 <= float(r["final_acc"]) <= 1.0 for r in records if r["final_acc"])
    assert {p.name for p in (tmp_path / "configs").iterdir()} == {f"{row}-e10.yaml" for row in ROWS}
