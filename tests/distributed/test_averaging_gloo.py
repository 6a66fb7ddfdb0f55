"""Weight averaging on 2 gloo ranks: the averages under ddp, zero2 and zero3 (DTensor shards, saved
through DCP) equal one process's; under DiLoCo the average is the mean of the global weights after
each outer synchronisation."""

from __future__ import annotations

import pytest
import torch

from bigbatch.launch.runtime import Runtime
from bigbatch.testing import run_ranks
from bigbatch.optim.averaging import averaged_weights
from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from tests.conftest import tiny_config

pytestmark = pytest.mark.distributed

EMA = {"enabled": True, "decay": 0.8, "debias": True, "every_steps": 2}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def train_average(rank: int, world_size: int, raw: dict) -> dict:
    """The run's final average (gathered whole), its count and the average read back from the last
    checkpoint by `averaged_weights` (one process reading whatever the strategy saved)."""
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"), "gloo" if world_size > 1 else None)
    trainer = build_trainer(validate_config(raw), runtime)
    trainer.fit()
    trainer.metrics.close()
    average = {name: full(t) for name, t in trainer.averaging.average.items()}
    last = trainer.checkpointer.latest()
    saved = averaged_weights(last) if rank == 0 else None
    return {"average": average, "count": trainer.averaging.count, "saved": saved, "eval": trainer.last_eval}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_ranks_average_like_one_process(tmp_path, strategy):
    # 6 steps of global batch 16, updates after steps 2, 4, 6; the 2 ranks see 8 samples each.
    # Evaluations at steps 3 and 6 swap the average in and out mid-run (FSDP2: into the shards).
    raw = tiny_config(tmp_path, run={"max_steps": 6}, ema=EMA, optim={"name": "adamw", "lr": 0.01},
                      distributed={"strategy": strategy}, eval={"every_steps": 3})
    reference = train_average(0, 1, {**raw, "run": {**raw["run"], "name": "ref"},
                                     "distributed": {"strategy": "ddp"}})
    assert reference["count"] == 3
    ranks = run_ranks(train_average, 2, raw, timeout_s=180)
    assert reference["eval"]["val_loss"] != reference["eval"]["val_loss_raw"]
    for result in ranks:
        assert result["count"] == 3
        for key in ("val_loss", "val_loss_raw", "val_accuracy"):
            assert result["eval"][key] == pytest.approx(reference["eval"][key], rel=1e-5)
        for name, expected in reference["average"].items():
            torch.testing.assert_close(result["average"][name], expected, rtol=0, atol=1e-6)
    saved = ranks[0]["saved"]  # zero2/3: gathered from step-N/dcp/; ddp: replicated.pt
    assert saved.keys() == reference["average"].keys()
    assert all(torch.equal(saved[k], v) for k, v in ranks[0]["average"].items())


def diloco_average(rank: int, world_size: int, raw: dict) -> dict:
    """DiLoCo's average and the global weights recorded after each step that synchronised."""
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"), "gloo")
    trainer = build_trainer(validate_config(raw), runtime)
    diloco, synced = trainer.strategy.diloco, []

    def record(tr) -> dict:
        if diloco.due_fragment(diloco.step) is not None:
            synced.append({n: t.detach().clone() for n, t in diloco.global_params.items()})
        return {}

    trainer.after_step.append(record)
    trainer.fit()
    trainer.metrics.close()
    return {"average": {n: t.clone() for n, t in trainer.averaging.average.items()}, "synced": synced,
            "count": trainer.averaging.count}


@pytest.mark.slow
def test_diloco_averages_the_global_weights_after_each_outer_step(tmp_path):
    # 2 replicas, H = 2, 8 steps: outer steps after 2, 4, 6, 8; SWA from 40 samples (step 3) on
    raw = tiny_config(tmp_path, run={"max_steps": 8}, distributed={"strategy": "diloco"},
                      diloco={"replicas": 2, "inner_steps": 2},
                      ema={"enabled": True, "kind": "swa", "start_samples": 40})
    ranks = run_ranks(diloco_average, 2, raw, timeout_s=180)
    for result in ranks:
        assert len(result["synced"]) == 4 and result["count"] == 3  # steps 4, 6, 8
        for name, got in result["average"].items():
            expected = torch.stack([s[name].double() for s in result["synced"][1:]]).mean(0)
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    for name, got in ranks[0]["average"].items():  # the global weights are the same on every rank
        assert torch.equal(got, ranks[1]["average"][name])
