"""heavyball's SOAP under zero1 on 2 gloo ranks: equal to ddp and to one process, and resumable.

zero1 (torch's ZeroRedundancyOptimizer) gives each rank whole parameters, so each rank's SOAP keeps
the Kronecker factors and eigenbases of whole matrices, exactly as one process does. Its checkpoint
goes through `Zero1OptimizerState`, which must also carry heavyball's own top-level state-dict entry
(the preconditioner-refresh counter): ZeRO's consolidated state dict keeps only `state` and
`param_groups`. One spawn runs everything on a tiny GPT; the single-process reference runs here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bigbatch.config import OptimConfig
from bigbatch.distributed.zero import Zero1OptimizerState, held_optimizer_bytes
from bigbatch.optim.factory import build_optimizer
from bigbatch.testing import run_ranks
from tests.distributed.test_muon_gloo import loss_of, make_model, batch, GLOBAL_BATCH
from tests.distributed.test_zero_gloo import full_params, make_strategy

pytest.importorskip("heavyball")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SAVE_AT = 8, 3  # an odd save step: SOAP refreshes its eigenbases every 2nd step() call
OPTIM = OptimConfig(name="soap", lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)


def set_lr(optimizer, step: int) -> None:
    for group in optimizer.param_groups:  # as the trainer's schedule does, every step
        group["lr"] = OPTIM.lr * (1 + step % 3) / 3


def train(model, optimizer, rank: int = 0, world: int = 1, steps: range = range(STEPS)) -> None:
    share = GLOBAL_BATCH // world
    for step in steps:
        set_lr(optimizer, step)
        x, y = batch(step)
        loss_of(model, x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def zero1_run(rank: int, world: int, steps: range, load: dict | None = None):
    strategy = make_strategy("zero1", make_model())
    optimizer = strategy.build_optimizer(OPTIM)
    if load is not None:
        strategy.module.load_state_dict(load["model"])
        Zero1OptimizerState(optimizer).load_state_dict(load["optimizer"])
    train(strategy.model, optimizer, rank, world, steps)
    return strategy, optimizer


def save_and_resume(rank: int, world: int, root: str) -> dict:
    """zero1 for SAVE_AT steps, saved as the checkpoint store does (before_save on every rank,
    state_dict on rank 0); fresh models and optimizers load it and take the remaining steps."""
    strategy, optimizer = zero1_run(rank, world, range(SAVE_AT))
    adapter = Zero1OptimizerState(optimizer)
    adapter.before_save()  # a collective
    path = Path(root, "zero1_soap.pt")
    if rank == 0:
        torch.save({"model": strategy.module.state_dict(), "optimizer": adapter.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=False)
    resumed, _ = zero1_run(rank, world, range(SAVE_AT, STEPS), load=saved)
    # ZeRO's own consolidated dict alone (no heavyball entry): the control the resume must beat
    bare = {"model": saved["model"],
            "optimizer": {"state": saved["optimizer"]["state"], "param_groups": saved["optimizer"]["param_groups"]}}
    without_extras, _ = zero1_run(rank, world, range(SAVE_AT, STEPS), load=bare)
    return {"resumed": full_params(resumed.module), "without_extras": full_params(without_extras.module),
            "saved_entries": sorted(saved["optimizer"]), "saved_state": len(saved["optimizer"]["state"])}


def rank_phase(rank: int, world: int, root: str) -> dict:
    out = {"resume": save_and_resume(rank, world, root)}
    ddp = make_strategy("ddp", make_model())
    train(ddp.model, build_optimizer(ddp.module, OPTIM), rank, world)
    out["ddp"] = full_params(ddp.module)
    strategy, optimizer = zero1_run(rank, world, range(STEPS))
    out["zero1"] = full_params(strategy.module)
    out["held_bytes"] = held_optimizer_bytes(optimizer)
    out["owned"] = len(optimizer.optim.state)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(rank_phase, 2, str(tmp_path_factory.mktemp("soap_zero1")), timeout_s=600)


def averaged_halves_step(model, optimizer, step: int) -> None:
    """One process, gradients exactly as 2 ranks all-reduce them: (g0 + g1) / 2 of the two halves of
    the batch (a sum of two is order-free, halving is exact)."""
    x, y = batch(step)
    halves = []
    for rank in range(2):
        loss_of(model, *(t[rank * GLOBAL_BATCH // 2:(rank + 1) * GLOBAL_BATCH // 2] for t in (x, y))).backward()
        halves.append([p.grad for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for p, g0, g1 in zip(model.parameters(), *halves):
        p.grad = (g0 + g1) / 2
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def single_process() -> tuple[dict[str, torch.Tensor], int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same matmul blocking, the same rounding
    try:
        model = make_model()
        optimizer = build_optimizer(model, OPTIM)
        for step in range(STEPS):
            set_lr(optimizer, step)
            averaged_halves_step(model, optimizer, step)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, held_optimizer_bytes(optimizer)


def test_zero1_equals_ddp_and_one_process_bitwise(two_ranks, single_process):
    expected, _ = single_process
    initial = dict(make_model().named_parameters())
    for out in two_ranks:
        assert out["zero1"].keys() == expected.keys()
        for key, value in expected.items():
            # zero1, ddp and the one process step from the same averaged gradients, and SOAP updates
            # every tensor on its own, so splitting the tensors over ranks changes nothing. No tolerance
            # is meaningful here: SOAP's Adam normalizes every eigen-direction, also those where the
            # gradient is rounding noise (rank-deficient factors), which then move by ±lr. On this GPT a
            # one-process full-batch run differs from averaged halves by 2e-2 after 2 steps (AdamW:
            # 1.4e-6); tests/unit/test_soap.py keeps that gap measured on an MLP.
            assert torch.equal(out["zero1"][key], out["ddp"][key]), key
            assert torch.equal(out["zero1"][key], value), key
            assert (value - initial[key]).abs().max() > 1e-3, key  # every tensor moved


def test_zero1_splits_the_whole_tensors_and_their_state_over_the_ranks(two_ranks, single_process):
    _, single_bytes = single_process
    owned = [out["owned"] for out in two_ranks]
    assert sum(owned) == len(list(make_model().parameters())) and min(owned) > 0
    held = [out["held_bytes"] for out in two_ranks]
    # heavyball keeps each group's step counter (int64, 8 bytes) with the group's first parameter:
    # 2 groups (decayed matrices, the rest), so the second rank holds 2 more counters than one process.
    assert sum(held) == single_bytes + 2 * 8 and max(held) < 0.6 * single_bytes


def test_zero1_resume_is_bitwise_and_needs_heavyballs_own_entry(two_ranks):
    n_params = len(list(make_model().parameters()))
    for out in two_ranks:
        resume = out["resume"]
        assert resume["saved_entries"] == ["heavyball", "param_groups", "state"]
        assert resume["saved_state"] == n_params  # every rank's shard, indexed like one optimizer
        uninterrupted = out["zero1"]
        for key, value in uninterrupted.items():
            assert torch.equal(resume["resumed"][key], value), key
        # Without heavyball's refresh counter the eigenbases are refreshed on other steps after an odd
        # save step: the run diverges, so the entry is what makes the resume exact.
        assert any(not torch.equal(resume["without_extras"][k], v) for k, v in uninterrupted.items())
