"""Smoke test of benchmarks/diloco.py --quick: DDP and DiLoCo (H=5, fp16 pseudo-gradients), 2 ranks
on loopback, on a small text written here (no download); table, JSON and PNG, bytes that follow from
the model's shape, and no rank process left behind."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

BENCH = REPO / "benchmarks" / "diloco.py"
STEPS, H, K = 20, 5, 2  # --quick: 20 steps, DiLoCo H=5 with 2 replicas


def gpt_parameters(vocab: int, seq_len: int = 16, d: int = 32, layers: int = 1) -> int:
    """--quick's GPT: tied token embedding, positions, per block 2 LayerNorms, qkv, proj, 4x MLP; final LN."""
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return vocab * d + seq_len * d + layers * block + 2 * d


def write_corpus(path: Path) -> str:
    random.seed(0)
    words = "to be or not that is the question whether tis nobler in the mind to suffer".split()
    text = " ".join(random.choice(words) for _ in range(3000))
    path.write_text(text)
    return text


def test_quick_benchmark_reports_loss_bytes_and_plot(tmp_path):
    text = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--corpus", str(tmp_path / "corpus.txt"),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=85)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads((out / "diloco.json").read_text())["rows"]}
    assert list(rows) == ["k2 DDP", "k2 DiLoCo H5 fp16"]
    ddp, diloco = rows["k2 DDP"], rows["k2 DiLoCo H5 fp16"]

    vocab = len(set(text))
    params = gpt_parameters(vocab)
    # DDP all-reduces every fp32 gradient every step; DiLoCo an fp16 pseudo-gradient every H steps,
    # after broadcasting replica 0's fp32 state_dict once, which lists the tied embedding twice
    # (tok.weight and head.weight).
    assert ddp["bytes_by_kind"]["grad_allreduce"] == STEPS * params * 4
    assert diloco["bytes_by_kind"]["diloco_outer"] == STEPS // H * params * 2
    assert diloco["bytes_by_kind"]["diloco_init"] == (params + vocab * 32) * 4
    assert diloco["sync_fewer"] == pytest.approx(2 * H)
    assert diloco["total_fewer"] == pytest.approx(ddp["total_bytes"] / diloco["total_bytes"])
    for row in (ddp, diloco):
        assert row["steps"] == STEPS and row["samples"] == STEPS * 8  # equal samples for every row
        assert [s for s, _ in row["curve"]] == [80, 160]  # evaluated every 10 steps
        assert 0 < row["val_loss"] < 4 and row["wall_s"] > 0
    assert diloco["loss_gap"] == pytest.approx(diloco["val_loss"] / ddp["val_loss"] - 1)

    table = (out / "diloco.md").read_text()
    assert "| k2 DDP | loopback | 20 | 160 |" in table and "| k2 DiLoCo H5 fp16 | loopback |" in table
    assert (out / "diloco.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert processes_mentioning(str(out)) == []


def test_unknown_row_is_rejected_before_running(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--rows", "k3 DDP", "--corpus",
                             str(tmp_path), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "--rows: unknown ['k3 DDP']" in result.stderr


def test_ddp_equivalent_samples_interpolate_between_evaluations():
    from benchmarks.diloco import samples_to_reach

    curve = [(100, 3.0), (200, 2.0), (300, 1.5)]
    assert samples_to_reach(curve, 2.5) == pytest.approx(100 + 100 * (3.0 - 2.5) / (3.0 - 2.0))
    assert samples_to_reach(curve, 1.75) == pytest.approx(200 + 100 * (2.0 - 1.75) / (2.0 - 1.5))
    assert samples_to_reach(curve, 3.5) == 100  # already reached at the first evaluation
    assert samples_to_reach(curve, 1.0) is None  # never reached
