"""`bigbatch lr-find`: exponential sweep, early stop on divergence, plot and suggestion."""

from __future__ import annotations

import json

import pytest

from bigbatch.cli import main
from tests.conftest import tiny_config, write_config

pytestmark = pytest.mark.e2e


def test_lr_find_sweeps_stops_on_divergence_and_suggests(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, optim={"name": "sgd", "momentum": 0.9}))
    code = main(["lr-find", str(config), "--min-lr", "1e-3", "--max-lr", "1e4", "--steps", "40"])
    assert code == 0
    run_dir = tmp_path / "runs" / "tiny"
    result = json.loads((run_dir / "lr_find.json").read_text())
    lrs, losses = result["lrs"], result["losses"]
    assert 3 < len(losses) < 40  # an LR of 1e4 diverges long before the end of the sweep
    assert lrs[0] == pytest.approx(1e-3)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([(1e4 / 1e-3) ** (1 / 39)] * len(ratios))  # exponential spacing
    assert lrs[0] <= result["suggested_lr"] <= lrs[-1]
    assert (run_dir / "lr_find.png").is_file()
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    out = capsys.readouterr().out
    assert "suggested lr" in out and f"set optim.lr: {result['optim_lr']:.4g}" in out and "lr_find.json" in out
    assert result["optim_lr"] == result["suggested_lr"]  # rule none: optim.lr is the LR itself


def test_lr_find_suggests_optim_lr_with_the_scaling_removed(tmp_path, capsys):
    # linear scaling from base_batch 4 at global batch 16: the swept LR is 16/4 = 4x optim.lr
    config = write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, optim={"name": "sgd", "lr_scaling": {"rule": "linear", "base_batch": 4}}))
    assert main(["lr-find", str(config), "--min-lr", "1e-3", "--max-lr", "1e4", "--steps", "30"]) == 0
    result = json.loads((tmp_path / "runs" / "tiny" / "lr_find.json").read_text())
    assert result["optim_lr"] == pytest.approx(result["suggested_lr"] / 4)
    assert "by lr_scaling linear from base_batch 4" in capsys.readouterr().out
