"""Muon on 2 gloo ranks equals one process: ddp, zero1 (whole matrices owned by one rank each) and
zero2/zero3 (FSDP2 shards every matrix by rows; Newton–Schulz gathers the whole matrix).

zero3's sharded Muon state (DCP) resumes bitwise. One spawn runs every strategy on a tiny GPT
(embeddings, tied head, LayerNorms: the AdamW part; the blocks' qkv/proj/fc1/fc2: the Muon part); the
single-process reference runs in the test process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from bigbatch.config import OptimConfig
from bigbatch.models.gpt import GPT
from bigbatch.optim.factory import build_optimizer
from bigbatch.testing import run_ranks
from tests.distributed.test_zero_gloo import full_params, make_strategy

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL_BATCH, SEQ, VOCAB, STEPS = 8, 8, 11, 5
STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
OPTIM = OptimConfig(name="muon", lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.1, betas=(0.9, 0.95))


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, SEQ, n_layer=2, n_head=2, d_model=16)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def train(model, optimizer, rank: int = 0, world: int = 1, steps: range = range(STEPS)) -> None:
    share = GLOBAL_BATCH // world
    for step in steps:
        x, y = batch(step)
        loss_of(model, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def sharded_muon_matrices(optimizer) -> int:
    from torch.distributed.tensor import DTensor

    return sum(isinstance(p, DTensor) and p.placements[0].is_shard() and p.to_local().shape[0] < p.shape[0]
               for g in optimizer.param_groups if g["use_muon"] for p in g["params"])


def zero3_resume(rank: int, world_size: int, root: str) -> dict:
    """Save zero3's sharded model and Muon state (DCP) after 3 steps, go on 2 steps; a fresh model and
    optimizer loaded from the save take the same 2 steps."""
    runs = []
    for load in (False, True):
        strategy = make_strategy("zero3", make_model())
        optimizer = strategy.build_optimizer(OPTIM)
        checkpoint = strategy.sharded_checkpoint(optimizer)
        if load:
            checkpoint.load(Path(root, "dcp"))
        else:
            train(strategy.model, optimizer, rank, world_size, range(3))
            checkpoint.save(Path(root, "dcp"))
        dist.barrier()
        train(strategy.model, optimizer, rank, world_size, range(3, 5))
        runs.append(full_params(strategy.module))
    return {"uninterrupted": runs[0], "resumed": runs[1]}


def rank_phase(rank: int, world_size: int, root: str) -> dict:
    out = {"zero3_resume": zero3_resume(rank, world_size, root)}
    for name in STRATEGIES:
        strategy = make_strategy(name, make_model())
        optimizer = (build_optimizer(strategy.module, OPTIM) if name == "ddp"
                     else strategy.build_optimizer(OPTIM))
        train(strategy.model, optimizer, rank, world_size)
        out[name] = full_params(strategy.module)
        if name == "zero1":  # momentum buffers this rank holds: its share of the hidden matrices
            out["zero1_owned"] = sum("momentum_buffer" in s for s in optimizer.optim.state.values())
        if name in ("zero2", "zero3"):
            out[name + "_sharded"] = sharded_muon_matrices(optimizer)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(rank_phase, 2, str(tmp_path_factory.mktemp("muon_dcp")), timeout_s=300)


@pytest.fixture(scope="module")
def single_process() -> dict[str, torch.Tensor]:
    model = make_model()
    train(model, build_optimizer(model, OPTIM))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def tolerance(key: str) -> float:
    # The key third of qkv.bias has a zero gradient up to rounding (softmax ignores a constant added to
    # every key), and AdamW turns that rounding noise (sum over 2 ranks vs over 1 batch) into steps of
    # up to lr·(1 − β1)/√(1 − β2): measured 6e-6 after 5 steps. Every other tensor: ≤ 4e-7.
    return 2e-5 if key.endswith("qkv.bias") else 1e-6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_equal_one_process(two_ranks, single_process, strategy):
    initial = dict(make_model().named_parameters())
    for out in two_ranks:
        assert out[strategy].keys() == single_process.keys()
        for key, expected in single_process.items():
            torch.testing.assert_close(out[strategy][key], expected, rtol=0, atol=tolerance(key), msg=key)
            assert (expected - initial[key]).abs().max() > 1e-3, key  # every tensor moved
            # and the strategies agree with each other more tightly (the same averaged gradients)
            torch.testing.assert_close(out[strategy][key], out["ddp"][key], rtol=0, atol=1e-6, msg=key)


def test_zero1_splits_whole_matrices_and_fsdp_really_shards_them(two_ranks):
    owned = [out["zero1_owned"] for out in two_ranks]
    assert sum(owned) == 2 * 4 and min(owned) > 0  # 8 hidden matrices, each stepped by one rank
    for out in two_ranks:  # every hidden matrix is row-sharded: NS ran on gathered matrices
        assert out["zero2_sharded"] == out["zero3_sharded"] == 8


def test_zero3_muon_state_resumes_exactly_from_a_sharded_checkpoint(two_ranks):
    for out in two_ranks:
        resume = out["zero3_resume"]
        for key, value in resume["uninterrupted"].items():
            assert torch.equal(resume["resumed"][key], value), key
