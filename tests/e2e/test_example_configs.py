"""The example YAML files under configs/ validate, and the DiLoCo example runs as its comment says."""

from __future__ import annotations

import json

import pytest

from bigbatch.validate import load_config
from tests.conftest import REPO, needs_fashion_mnist
from tests.e2e.test_cli_launch import bigbatch

pytestmark = [pytest.mark.e2e, needs_fashion_mnist]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DILOCO_EXAMPLE = REPO / "configs" / "fashion_mnist_diloco.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_validates(path):
    load_config(path)  # raises ConfigError listing every problem


def test_diloco_example_syncs_fp16_pseudo_gradients_every_h_steps(tmp_path):
    cfg = load_config(DILOCO_EXAMPLE)
    h, steps = cfg.diloco.inner_steps, 2 * cfg.diloco.inner_steps
    result = bigbatch("launch", "--nproc-per-node", "2", str(DILOCO_EXAMPLE),
                      "--set", f"run.out_dir={tmp_path}", "--set", f"run.max_steps={steps}",
                      "--set", f"eval.every_steps={h}", "--set", "checkpoint.every_steps=null",
                      "--set", "metrics.tensorboard=false", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / cfg.run.name / "metrics.jsonl").open()]
    train = [r for r in rows if r.get("kind", "train") == "train"]
    widths = [28 * 28, *cfg.model.hidden, 10]  # the MLP: weights and biases of each linear layer
    params = sum(n_in * n_out + n_out for n_in, n_out in zip(widths, widths[1:]))
    outer = {r["step"]: r["comm_bytes/diloco_outer"] for r in train if r.get("comm_bytes/diloco_outer")}
    assert outer == {h: params * 2, steps: params * 2}  # fp16: 2 bytes a parameter, every H steps
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [h, steps]
    assert evals[-1]["val_accuracy"] > 0.5
