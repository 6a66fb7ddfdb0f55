"""ZeRO strategies from the CLI: zero1/zero2/zero3 train like DDP, a zero3 checkpoint saved on 4 ranks
resumes on 2, and impossible combinations are config errors (exit 2, nothing written)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

pytestmark = pytest.mark.e2e

LAMB = {"name": "lamb", "lr": 0.02, "weight_decay": 0.01}


def train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == "train"]


def launch(tmp_path, name: str, strategy: str, ranks: int = 2, steps: int = 6, optim: dict = LAMB,
           extra: dict | None = None):
    raw = tiny_config(tmp_path, run={"name": name, "max_steps": steps}, optim=optim,
                      model={"hidden": [16, 16]}, distributed={"strategy": strategy},
                      eval={"every_steps": 3}, checkpoint={"every_steps": 100}, **(extra or {}))
    raw["optim"] = optim
    config = write_config(tmp_path / f"{name}.yaml", raw)
    result = bigbatch("launch", "--nproc-per-node", str(ranks), str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_rows_close(actual: list[dict], expected: list[dict], keys=("loss", "grad_norm")) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for key in keys:
        assert [r[key] for r in actual] == pytest.approx([r[key] for r in expected], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("optim", [LAMB, {"name": "lars", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4,
                                          "trust_coefficient": 0.02}], ids=["lamb", "lars"])
def test_zero_strategies_train_like_ddp(tmp_path, optim):
    launch(tmp_path, "ddp", "ddp", optim=optim)
    expected = train_rows(tmp_path / "runs" / "ddp")
    for strategy in ("zero1", "zero2", "zero3"):
        launch(tmp_path, strategy, strategy, optim=optim)
        assert_rows_close(train_rows(tmp_path / "runs" / strategy), expected)
        evals = [r for r in map(json.loads, (tmp_path / "runs" / strategy / "metrics.jsonl").open())
                 if r.get("kind") == "eval"]
        assert [r["step"] for r in evals] == [3, 6]


def test_zero3_checkpoint_saved_on_four_ranks_resumes_on_two(tmp_path):
    launch(tmp_path, "reference", "zero3", ranks=2, steps=8)
    launch(tmp_path, "moved", "zero3", ranks=4, steps=4)  # checkpoint at the end: step 4
    step_dir = tmp_path / "runs" / "moved" / "checkpoints" / "step-00000004"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["strategy"] == "zero3"
    assert sorted(n for n in meta["files"] if n.startswith("dcp/")) == [
        "dcp/.metadata", *(f"dcp/__{r}_0.distcp" for r in range(4))]
    resumed = launch(tmp_path, "moved", "zero3", ranks=2, steps=8)
    assert "resumed from" in resumed.stdout
    rows = train_rows(tmp_path / "runs" / "moved")
    reference = train_rows(tmp_path / "runs" / "reference")
    assert_rows_close(rows, reference)  # steps 1-4 on 4 ranks, 5-8 on 2: the same training


@pytest.mark.parametrize("sections, key", [
    ({"distributed": {"strategy": "deepspeed"}, "optim": {"name": "lamb"}}, "#490"),
    ({"distributed": {"strategy": "zero2"}, "compression": {"method": "powersgd"}}, "compression.method"),
    ({"distributed": {"strategy": "zero3"}, "metrics": {"noise_scale": True}}, "metrics.noise_scale"),
    ({"distributed": {"strategy": "zero1"}, "optim": {"name": "schedule_free_adamw"}}, "schedule_free_adamw"),
], ids=["deepspeed-lamb", "zero2-powersgd", "zero3-noise", "zero1-schedule-free"])
def test_impossible_sharding_combinations_exit_2(tmp_path, sections, key):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections))
    result = bigbatch("launch", "--nproc-per-node", "2", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert key in result.stderr
    assert not (tmp_path / "runs").exists()


def test_sharding_on_one_process_says_to_launch_ranks(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, distributed={"strategy": "zero2"}))
    result = bigbatch("train", str(config))
    assert result.returncode == 2
    assert "distributed.strategy: zero2" in result.stderr and "--nproc-per-node" in result.stderr
    assert not (tmp_path / "runs").exists()


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ADAMW = {"name": "adamw", "lr": 0.01, "grad_clip": 1.0}


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install '.[deepspeed]')")
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_trains_like_ddp(tmp_path, stage):
    launch(tmp_path, "ddp", "ddp", optim=ADAMW)
    raw_stage = {"deepspeed": {"stage": stage}}
    launch(tmp_path, f"ds{stage}", "deepspeed", optim=ADAMW, extra=raw_stage)
    assert_rows_close(train_rows(tmp_path / "runs" / f"ds{stage}"), train_rows(tmp_path / "runs" / "ddp"),
                      keys=("loss",))
    step_dir = tmp_path / "runs" / f"ds{stage}" / "checkpoints" / "step-00000006"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert any(name.startswith("deepspeed/") for name in meta["files"])
