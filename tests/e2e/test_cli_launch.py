"""The CLI end to end: `bigbatch launch` with 2 gloo ranks, and a killed rank that must not hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.e2e


def bigbatch(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigbatch", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_launch_two_ranks_trains_and_writes_metrics(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, eval={"every_steps": 2}))
    result = bigbatch("launch", "--nproc-per-node", "2", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["samples"] for r in train] == [16, 32, 48, 64, 80]
    assert [r["step"] for r in rows if r.get("kind") == "eval"] == [2, 4, 5]
    assert (run_dir / "config.yaml").read_text().count("global_batch: 16") == 1
    assert "done: 5 steps, 80 samples" in result.stdout


def test_killed_rank_fails_the_job_without_hanging(tmp_path):
    # Rank 1's model SIGKILLs its process at step 3; torchrun must stop rank 0 and exit non-zero.
    model = {"name": "tests.custom_components:DyingMLP",
             "kwargs": {"d_in": 8, "classes": 3, "die_rank": 1, "die_at": 3}}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, run={"max_steps": 10_000}, model=model))
    result = bigbatch("launch", "--nproc-per-node", "2", str(config), "--set", "distributed.timeout_s=30",
                      timeout=180)
    assert result.returncode != 0
    assert "done:" not in result.stdout


def test_report_writes_plots(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, eval={"every_steps": 2}))
    assert bigbatch("train", str(config)).returncode == 0
    result = bigbatch("report", str(tmp_path / "runs" / "tiny"))
    assert result.returncode == 0, result.stderr
    written = sorted(os.path.basename(p) for p in result.stdout.split())
    assert {"loss.png", "lr.png", "val_accuracy.png", "global_batch.png"} <= set(written)


def test_bench_allreduce_prints_a_row_per_size(tmp_path):
    result = bigbatch("bench", "allreduce", "--nproc-per-node", "2", "--sizes", "64K,256K", "--iters", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.strip().startswith(("64K", "256K"))]
    assert [row[:3] for row in lines] == [["64K", "65536", "2"], ["256K", "262144", "2"]]
    for row in lines:  # 2 ranks: busbw = algbw·2(N−1)/N = algbw, and algbw = bytes / latency
        latency_s, algbw, busbw = float(row[3]) * 1e-6, float(row[4]), float(row[5])
        assert busbw == pytest.approx(algbw, abs=1e-3)
        assert algbw == pytest.approx(int(row[1]) / latency_s / 1e9, rel=0.02, abs=2e-3)


def test_bench_rejects_bad_sizes():
    result = bigbatch("bench", "allreduce", "--sizes", "12Q")
    assert result.returncode == 2 and "--sizes" in result.stderr
