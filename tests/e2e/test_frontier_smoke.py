"""Smoke test of benchmarks/frontier.py: `--quick` trains three variants of the demo on 2 ranks and
reports bytes that follow from the model's shapes; the Pareto front is checked on hand-made points."""

from __future__ import annotations

import json

import pytest

from benchmarks.frontier import mark_front
from tests.conftest import needs_fashion_mnist, run_benchmark

QUICK_PARAMS = 784 * 32 + 32 + 32 * 10 + 10  # --quick's demo MLP: hidden [32]
QUICK_STEPS = 4


@pytest.mark.e2e
@needs_fashion_mnist
def test_quick_demo_frontier_counts_bytes_from_the_shapes(tmp_path):
    result = run_benchmark("frontier.py", "--quick", "--workloads", "demo", "--out", str(tmp_path),
                           cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "frontier.json").read_text())["demo"]}
    assert list(rows) == ["none", "powersgd r2", "diloco H2 fp16"]
    assert rows["none"]["sync_bytes"] == QUICK_STEPS * 4 * QUICK_PARAMS  # fp32 all-reduce every step
    assert rows["diloco H2 fp16"]["sync_bytes"] == QUICK_STEPS // 2 * 2 * QUICK_PARAMS  # fp16, every 2 steps
    # step 1 plain, then P and Q of both weight matrices (rank 2) and the biases plain (powersgd_uncompressed)
    compressed = (784 + 32) * 2 + (32 + 10) * 2 + 32 + 10
    assert rows["powersgd r2"]["sync_bytes"] == 4 * (QUICK_PARAMS + (QUICK_STEPS - 1) * compressed)
    assert rows["none"]["fewer"] == 1.0 and rows["diloco H2 fp16"]["fewer"] == 4.0
    assert (tmp_path / "frontier.png").stat().st_size > 0 and "front" in (tmp_path / "frontier.md").read_text()


def test_pareto_front_keeps_only_undominated_points():
    points = [("none", 100, 0.90), ("a", 10, 0.85), ("b", 50, 0.80), ("c", 5, 0.85), ("d", 5, 0.70)]
    results = [{"variant": v, "sync_bytes": b, "quality": q} for v, b, q in points]
    mark_front(results, higher_is_better=True)
    assert {r["variant"] for r in results if r["front"]} == {"none", "c"}
    assert [r["fewer"] for r in results] == [1.0, 10.0, 2.0, 20.0, 20.0]
    losses = [("none", 100, 1.50), ("a", 10, 1.55), ("b", 50, 1.52), ("c", 5, 1.55), ("d", 5, 1.70)]
    results = [{"variant": v, "sync_bytes": b, "quality": q} for v, b, q in losses]
    mark_front(results, higher_is_better=False)  # a loss: lower is better
    assert {r["variant"] for r in results if r["front"]} == {"none", "b", "c"}


def test_an_unknown_variant_exits_2_in_one_line_and_writes_nothing(tmp_path):
    result = run_benchmark("frontier.py", "--variants", "powersgd r3", "--out", str(tmp_path / "out"),
                           cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--variants: unknown ['powersgd r3']" in result.stderr and "'powersgd r2'" in result.stderr
    assert not (tmp_path / "out").exists()
