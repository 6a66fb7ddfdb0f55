"""Smoke test of benchmarks/powersgd_probes.py (`--quick`) and its compressor: the simulation's PowerSGD
recovers a mean of rank-r matrices exactly and keeps each rank's residual as error feedback."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.powersgd_probes import PowerSGD
from tests.conftest import needs_fashion_mnist, run_benchmark


def test_powersgd_recovers_a_low_rank_mean_and_keeps_the_residuals():
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(30, 2, generator=gen, dtype=torch.float64), torch.randn(20, 2, generator=gen, dtype=torch.float64)
    a, b = u @ v.t(), u @ torch.randn(20, 2, generator=gen, dtype=torch.float64).t()  # same column space
    psgd = PowerSGD()
    psgd.q["w"] = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    approx = psgd.mean("w", [a, b], rank=2)
    torch.testing.assert_close(approx, (a + b) / 2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(psgd.error[("w", 0)], a - approx)  # each rank's own residual
    torch.testing.assert_close(psgd.error[("w", 0)] + psgd.error[("w", 1)], torch.zeros_like(a), atol=1e-10, rtol=0)
    full = torch.randn(30, 20, generator=gen, dtype=torch.float64)  # rank 20: rank 2 cannot hold it
    assert torch.linalg.matrix_rank(psgd.mean("w", [full, full], rank=2)) <= 2


@pytest.mark.e2e
@needs_fashion_mnist
def test_quick_run_prints_both_variants_and_writes_json_and_png(tmp_path):
    result = run_benchmark("powersgd_probes.py", "--quick", "--out", str(tmp_path), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "powersgd_probes.json").read_text())
    assert [r["name"] for r in rows] == ["none", "r2"] and all(r["steps"] == 3 for r in rows)
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in rows) and rows[0]["val_accuracy"] != rows[1]["val_accuracy"]
    assert (tmp_path / "powersgd_probes.png").stat().st_size > 0


def test_an_unknown_variant_exits_2_in_one_line_and_writes_nothing(tmp_path):
    result = run_benchmark("powersgd_probes.py", "--variants", "r3", "--out", str(tmp_path / "out"),
                           cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--variants: unknown ['r3']" in result.stderr and "'r2'" in result.stderr
    assert not (tmp_path / "out").exists()
