"""Issue 19 item 6 on 2 gloo ranks: losses reduced every 10 steps in one collective are the same
numbers as losses reduced every step (two ranks: a + b is exact in any order)."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch.launch.runtime import Runtime
from bigbatch.testing import run_ranks
from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from tests.conftest import tiny_config

pytestmark = pytest.mark.distributed


def train_rows(rank: int, world_size: int, raw: dict, loss_every: int) -> list[tuple]:
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"), "gloo")
    trainer = build_trainer(validate_config(raw), runtime)
    trainer.loss_every = loss_every
    trainer.fit()
    trainer.metrics.close()
    if rank:
        return []
    lines = (trainer.checkpointer.root.parent / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if r.get("kind", "train") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "diloco"])
def test_two_ranks_log_the_same_losses(tmp_path, strategy):
    raw = tiny_config(tmp_path, run={"max_steps": 13}, distributed={"strategy": strategy},
                      diloco={"replicas": 2, "inner_steps": 4}, checkpoint={"every_steps": 6},
                      metrics={"log_every_steps": 10, "tensorboard": False, "progress": "none"})
    every = run_ranks(train_rows, 2, {**raw, "run": {**raw["run"], "name": "every"}}, 1)[0]
    deferred = run_ranks(train_rows, 2, {**raw, "run": {**raw["run"], "name": "deferred"}}, 10)[0]
    assert [step for step, *_ in every] == list(range(1, 14))
    assert deferred == every
