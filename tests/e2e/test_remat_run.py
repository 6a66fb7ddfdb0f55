"""Rematerialization from YAML: same losses, fewer saved activation bytes, and `bigbatch plan`."""

from __future__ import annotations

import json

import pytest

from bigbatch.cli import main
from tests.conftest import REPO, tiny_config, write_config

pytestmark = pytest.mark.e2e


def gpt_config(tmp_path, policy: str) -> dict:
    return tiny_config(tmp_path, run={"name": policy, "max_steps": 3},
                       data={"name": "text", "path": str(REPO / "README.md"), "seq_len": 32},
                       model={"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32},
                       optim={"name": "adamw", "lr": 1e-3}, batch={"global_batch": 8},
                       remat={"policy": policy, "measure_every_steps": 1})


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == "train"]


def test_remat_keeps_losses_and_saves_activation_memory(tmp_path):
    results = {}
    for policy in ("none", "selective", "full"):
        assert main(["train", str(write_config(tmp_path / f"{policy}.yaml", gpt_config(tmp_path, policy)))]) == 0
        rows = train_rows(tmp_path / "runs" / policy)
        results[policy] = ([r["loss"] for r in rows], rows[0]["activation_bytes"])
    assert results["none"][0] == results["full"][0] == results["selective"][0]  # recomputation is exact
    assert results["none"][1] > results["selective"][1] > results["full"][1]


def test_plan_command_reports_every_strategy(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", gpt_config(tmp_path, "full"))
    assert main(["plan", str(config), "--world-size", "4", "--device-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        assert f"\n{strategy:>8}" in out or f"\n   {strategy}" in out
    assert "configured ddp + remat full" in out
    assert main(["plan", str(config), "--world-size", "4", "--device-memory", "lots"]) == 2
