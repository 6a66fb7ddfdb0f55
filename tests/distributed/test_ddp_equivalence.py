"""N gloo ranks × batch B/N must train exactly like one process × batch B."""

from __future__ import annotations

import pytest
import torch

from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from bigbatch.launch.runtime import Runtime
from bigbatch.testing import run_ranks
from tests.conftest import tiny_config

pytestmark = pytest.mark.distributed


def train_params(rank: int, world_size: int, raw: dict) -> dict[str, torch.Tensor]:
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"), "gloo" if world_size > 1 else None)
    trainer = build_trainer(validate_config(raw), runtime)
    trainer.fit()
    trainer.metrics.close()
    return {k: v.detach().clone() for k, v in trainer.strategy.module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [None, 4], ids=["no-accumulation", "accumulation"])
def test_two_ranks_match_one_process(tmp_path, micro_batch):
    # 5 steps of global batch 16: one process uses 16 per step (or 4 micro-batches of 4); two ranks
    # use 8 each (or 2 micro-batches of 4). Same samples per step, so the same mean gradient.
    raw = tiny_config(tmp_path, batch={"global_batch": 16, "micro_batch": micro_batch},
                      run={"max_steps": 5}, optim={"name": "sgd", "lr": 0.5, "momentum": 0.9})
    reference = train_params(0, 1, {**raw, "run": {**raw["run"], "name": "ref"}})
    ranks = run_ranks(train_params, 2, raw, timeout_s=120)
    for name, expected in reference.items():
        for rank_params in ranks:
            torch.testing.assert_close(rank_params[name], expected, rtol=0, atol=1e-6)
    initial = build_trainer(validate_config(raw), Runtime(0, 1, 0, torch.device("cpu"), None))
    moved = [k for k, v in initial.strategy.module.state_dict().items() if not torch.equal(v, reference[k])]
    assert moved  # the comparison is not vacuous: training changed the parameters
