"""Lion and schedule-free AdamW on 2 gloo ranks equal the reference packages on one process.

Lion under ddp, zero1, zero2 and zero3; schedule-free AdamW under ddp, zero2 and zero3 (zero1 is
refused: ZeroRedundancyOptimizer does not forward eval/train), with an eval/train switch midway.
The reference is lion-pytorch's / schedulefree's optimizer stepping the same model on the whole
global batch in this process; both are elementwise, so sharding must not change a number beyond
the rounding of the gradient average (DDP's mean of two half-batch gradients vs the full batch).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bigbatch.config import OptimConfig
from bigbatch.optim.factory import build_optimizer, param_groups
from bigbatch.testing import run_ranks
from tests.distributed.test_zero_gloo import full_params, global_batch, make_model, make_strategy, train

lion_pytorch = pytest.importorskip("lion_pytorch")  # pip install 'bigbatch[dev]'
schedulefree = pytest.importorskip("schedulefree")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, EVAL_AT = 8, 5  # schedule-free: eval() after step 5, the x weights recorded, train() again
LION = dict(name="lion", lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5)
SCHEDULE_FREE = dict(name="schedule_free_adamw", lr=0.01, betas=(0.9, 0.999), weight_decay=0.1)
STRATEGIES = {"lion": ("ddp", "zero1", "zero2", "zero3"), "schedule_free_adamw": ("ddp", "zero2", "zero3")}


def run_ours(name: str, settings: dict) -> dict:
    strategy = make_strategy(name, make_model())
    cfg = OptimConfig(**settings)
    optimizer = build_optimizer(strategy.module, cfg) if name == "ddp" else strategy.build_optimizer(cfg)
    out = {}
    for step in range(STEPS):
        train(strategy, optimizer, range(step, step + 1))
        if step + 1 == EVAL_AT and hasattr(optimizer, "eval"):
            optimizer.eval()
            out["x"] = full_params(strategy.module)
            optimizer.train()
    out["params"] = full_params(strategy.module)
    return out


def two_rank_phase(rank: int, world_size: int) -> dict:
    return {(settings["name"], name): run_ours(name, settings)
            for settings in (LION, SCHEDULE_FREE) for name in STRATEGIES[settings["name"]]}


def run_reference(optimizer_class, settings: dict) -> dict:
    model = make_model()
    knobs = {k: v for k, v in settings.items() if k not in ("name", "weight_decay")}
    optimizer = optimizer_class(param_groups(model, settings["weight_decay"], False), **knobs)
    if hasattr(optimizer, "train"):
        optimizer.train()  # schedulefree starts in eval mode
    out = {}
    for step in range(STEPS):
        x, y = global_batch(step)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step + 1 == EVAL_AT and hasattr(optimizer, "eval"):
            optimizer.eval()
            out["x"] = {k: v.detach().clone() for k, v in model.named_parameters()}
            optimizer.train()
    out["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(two_rank_phase, 2, timeout_s=240)


@pytest.mark.parametrize("optimizer", ["lion", "schedule_free_adamw"])
def test_ours_on_two_ranks_equals_reference_on_one(two_ranks, optimizer):
    if optimizer == "lion":
        expected = run_reference(lion_pytorch.Lion, LION)
    else:
        expected = run_reference(schedulefree.AdamWScheduleFree, SCHEDULE_FREE)
    for rank_out in two_ranks:
        for name in STRATEGIES[optimizer]:
            actual = rank_out[optimizer, name]
            assert actual.keys() == expected.keys()
            for point in expected:
                for key, value in expected[point].items():
                    torch.testing.assert_close(actual[point][key], value, rtol=0, atol=1e-6,
                                               msg=lambda m: f"{name} {point} {key}: {m}")
