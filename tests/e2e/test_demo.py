"""The README's demo: `bigbatch launch --nproc-per-node 2 configs/fashion_mnist.yaml` (large-batch LAMB)
reaches the promised test accuracy on the real Fashion-MNIST."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, needs_fashion_mnist
from tests.e2e.test_cli_launch import bigbatch

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_fashion_mnist]


def test_demo_config_reaches_the_readme_accuracy(tmp_path):
    result = bigbatch("launch", "--nproc-per-node", "2", str(REPO / "configs" / "fashion_mnist.yaml"),
                      "--set", f"run.out_dir={tmp_path}", "--set", "metrics.tensorboard=false",
                      timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "fashion_mnist" / "metrics.jsonl").open()]
    batches = [r for r in rows if r.get("kind") == "batch_change"]
    assert [b["global_batch"] for b in batches] == [4096]
    assert batches[0]["peak_lr"] == pytest.approx(0.002 * 8 * 2 ** 0.5)  # linear to 2048, then sqrt
    final = [r for r in rows if r.get("kind") == "eval"][-1]
    assert final["val_accuracy"] >= 0.85
