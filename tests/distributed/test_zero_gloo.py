"""ZeRO sharding on gloo ranks: zero1/zero2/zero3 train exactly like DDP, also with LARS/LAMB (whose
trust ratios need whole-tensor norms); sharded checkpoints reshard between 4 and 2 ranks; DeepSpeed
refuses LARS/LAMB at stage >= 1.

Ranks are expensive to spawn on a busy machine, so each module fixture runs one spawn that records
everything several tests then check.
"""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from bigbatch.checkpoint.store import files_under
from bigbatch.compression.factory import build_compressor
from bigbatch.config import OptimConfig
from bigbatch.distributed.ddp import DDPStrategy
from bigbatch.distributed.zero import (DCPCheckpoint, DeepSpeedStrategy, ShardGroupNorms, ShardedStrategy,
                                       Zero1OptimizerState, Zero1Strategy,
                                       deepspeed_problems, held_optimizer_bytes, zero_problems)
from bigbatch.models.mlp import MLP
from bigbatch.optim.factory import build_optimizer
from bigbatch.optim.lars import local_norms
from bigbatch.testing import run_ranks

pytestmark = pytest.mark.distributed

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
GLOBAL_BATCH, STEPS = 16, 10
OPTIMIZERS = {
    "lamb": dict(name="lamb", lr=0.02, weight_decay=0.01),
    "lars": dict(name="lars", lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02),
    "adamw": dict(name="adamw", lr=0.01),
}
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- rank-side helpers

def make_model() -> MLP:
    """Two blocks and a 3-row head: 2 ranks shard the head 2+1 rows, 4 ranks 1+1+1+0 (an empty shard)."""
    torch.manual_seed(0)
    return MLP((8,), 3, [16, 16])


def make_strategy(name: str, model):
    if name == "ddp":
        return DDPStrategy(model, CPU, 25.0, build_compressor("none"))
    if name == "zero1":
        return Zero1Strategy(model, CPU, 25.0, build_compressor("none"))
    return ShardedStrategy(model, CPU, stage=int(name[-1]))


def make_optimizer(strategy, name: str, optim: str):
    cfg = OptimConfig(**OPTIMIZERS[optim])
    return build_optimizer(strategy.module, cfg) if name == "ddp" else strategy.build_optimizer(cfg)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def train(strategy, optimizer, steps: range, accum: int = 1, grad_clip: float | None = None) -> list[float]:
    """The trainer's step: rank share of the global batch in `accum` micro-batches, clip, step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = GLOBAL_BATCH // world
    norms = []
    for step in steps:
        x, y = global_batch(step)
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        for i, (xc, yc) in enumerate(zip(xs.chunk(accum), ys.chunk(accum))):
            with strategy.sync_context(last_micro_step=i == accum - 1):
                (F.cross_entropy(strategy.model(xc), yc) / accum).backward()
        params = [p for p in strategy.module.parameters() if p.grad is not None]
        limit = grad_clip if grad_clip is not None else float("inf")
        norms.append(torch.nn.utils.clip_grad_norm_(params, limit).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def full_params(module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.named_parameters()}


def run_case(name: str, optim: str, accum: int = 1, grad_clip: float | None = None, norm_fn=None):
    strategy = make_strategy(name, make_model())
    optimizer = make_optimizer(strategy, name, optim)
    if norm_fn is not None:
        optimizer.set_norm_fn(norm_fn)
    norms = train(strategy, optimizer, range(STEPS), accum, grad_clip)
    return strategy, optimizer, {"params": full_params(strategy.module), "norms": norms}


def shard_local_norms(tensors):
    """What a naive sharded LARS/LAMB would do: the norm of the local shard only."""
    from torch.distributed.tensor import DTensor

    return local_norms([t.to_local() if isinstance(t, DTensor) else t for t in tensors])


CASES = {  # (optimizer, accumulation, grad_clip); LARS clips to exercise DTensor clipping
    "lamb": ("lamb", 2, None),
    "lars": ("lars", 1, 0.5),
}


def two_rank_phase(rank: int, world_size: int, root: str) -> dict:
    """Everything the 2-rank tests check, in one spawn; ends with the first DCP save ("from2")."""
    out: dict = {}
    for case, (optim, accum, clip) in CASES.items():
        for name in ("ddp", "zero1", "zero2", "zero3"):
            strategy, optimizer, result = run_case(name, optim, accum, clip)
            out[case, name] = result
            if isinstance(strategy, ShardedStrategy) and optim == "lamb":
                out["norm_calls", name] = optimizer.norm_fn.calls
            if name == "zero1" and optim == "lamb":
                out["zero1_groups"] = [dict((k, v) for k, v in g.items() if k != "params")
                                       for g in optimizer.optim.param_groups]
    out["shard_local"] = run_case("zero3", "lamb", 2, None, norm_fn=shard_local_norms)[2]
    out.update(zero1_round_trip(rank))
    out["state_bytes"] = {name: state_bytes_after_one_step(name) for name in ("ddp", "zero1", "zero2", "zero3")}
    out["state_shapes"] = zero1_local_state_shapes()
    out["dcp"] = dcp_phase(rank, world_size, root, None, 0, "from2", 2)
    return out


def zero1_round_trip(rank: int) -> dict:
    """Save a zero1 LAMB state after 4 steps, load it into fresh copies, train on: same as no save."""
    strategy = make_strategy("zero1", make_model())
    optimizer = make_optimizer(strategy, "zero1", "lamb")
    ddp = make_strategy("ddp", make_model())
    ddp_opt = make_optimizer(ddp, "ddp", "lamb")
    train(strategy, optimizer, range(4))
    train(ddp, ddp_opt, range(4))
    adapter = Zero1OptimizerState(optimizer)
    adapter.before_save()  # every rank: a collective
    payload = [None]
    if rank == 0:
        buffer = io.BytesIO()
        torch.save({"model": strategy.module.state_dict(), "optimizer": adapter.state_dict()}, buffer)
        payload = [buffer.getvalue()]
    dist.broadcast_object_list(payload, src=0)
    saved = torch.load(io.BytesIO(payload[0]), weights_only=True)

    fresh = make_strategy("zero1", make_model())
    fresh.module.load_state_dict(saved["model"])
    fresh_opt = make_optimizer(fresh, "zero1", "lamb")
    Zero1OptimizerState(fresh_opt).load_state_dict(saved["optimizer"])
    train(fresh, fresh_opt, range(4, 7))
    train(strategy, optimizer, range(4, 7))
    return {"zero1_saved_state": saved["optimizer"]["state"], "ddp_state": ddp_opt.state_dict()["state"],
            "resumed": full_params(fresh.module), "uninterrupted": full_params(strategy.module)}


def state_bytes_after_one_step(name: str) -> int:
    strategy = make_strategy(name, make_model())
    optimizer = make_optimizer(strategy, name, "lamb")
    train(strategy, optimizer, range(1))
    return held_optimizer_bytes(optimizer)


def zero1_local_state_shapes() -> list[tuple[tuple, tuple]]:
    """(param shape, exp_avg shape) of every tensor this rank's ZeRO-1 shard steps."""
    strategy = make_strategy("zero1", make_model())
    optimizer = make_optimizer(strategy, "zero1", "lamb")
    train(strategy, optimizer, range(1))
    return [(tuple(p.shape), tuple(s["exp_avg"].shape)) for p, s in optimizer.optim.state.items()]


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dcp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def two_ranks(dcp_root) -> list[dict]:
    return run_ranks(two_rank_phase, 2, str(dcp_root), timeout_s=240)


def assert_same_params(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


# ----------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_two_ranks_match_ddp_after_ten_steps(two_ranks, case, strategy):
    for rank_out in two_ranks:
        assert_same_params(rank_out[case, strategy]["params"], rank_out[case, "ddp"]["params"])
        # the global gradient norm the trainer logs (and clips with) is the same number
        torch.testing.assert_close(rank_out[case, strategy]["norms"], rank_out[case, "ddp"]["norms"],
                                   rtol=1e-5, atol=0)
    initial = {k: v.detach() for k, v in make_model().named_parameters()}
    assert all((two_ranks[0][case, "ddp"]["params"][k] - v).abs().max() > 1e-3 for k, v in initial.items())


def test_lars_case_really_clips(two_ranks):
    # the comparison above covers clipping only if the norm exceeded the 0.5 limit at some step
    assert max(two_ranks[0]["lars", "ddp"]["norms"]) > 0.5


def test_shard_local_norm_would_not_match(two_ranks):
    # Same run as the zero3 LAMB case, but trust ratios from each rank's shard alone: clearly off.
    reference = two_ranks[0]["lamb", "ddp"]["params"]
    local = two_ranks[0]["shard_local"]["params"]
    worst = max((local[k] - reference[k]).abs().max().item() for k in reference)
    assert worst > 1e-4  # 100 times the tolerance the sharded runs meet


def test_sharded_norms_take_one_all_reduce_per_bucket_call(two_ranks):
    # LAMB adapts one bucket per step (the matrices; biases are excluded): 10 steps, 10 all-reduces
    for name in ("zero2", "zero3"):
        assert two_ranks[0]["norm_calls", name] == STEPS


def test_zero1_keeps_parameter_groups(two_ranks):
    groups = two_ranks[0]["zero1_groups"]
    assert [g["exclude_from_adaptation"] for g in groups] == [False, True]
    assert [g["weight_decay"] for g in groups] == [OPTIMIZERS["lamb"]["weight_decay"], 0.0]


def test_zero1_steps_whole_parameters(two_ranks):
    # ZeRO-1 shards by whole tensors, so each local trust ratio already sees the whole tensor
    for rank_out in two_ranks:
        assert rank_out["state_shapes"] and all(p == s for p, s in rank_out["state_shapes"])


# ------------------------------------------------------------------------------- zero1 checkpoint

def test_zero1_consolidated_state_equals_unsharded_optimizer_state(two_ranks):
    saved, ddp = two_ranks[0]["zero1_saved_state"], two_ranks[0]["ddp_state"]
    assert saved.keys() == ddp.keys() and len(saved) == len(list(make_model().parameters()))
    for index, state in ddp.items():
        assert saved[index]["step"] == state["step"] == 4
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved[index][key], state[key], rtol=0, atol=1e-6)


def test_zero1_state_round_trip_resumes_exactly(two_ranks):
    for rank_out in two_ranks:
        assert_same_params(rank_out["resumed"], rank_out["uninterrupted"])


def test_zero1_state_dict_needs_before_save():
    adapter = Zero1OptimizerState(optimizer=None)
    with pytest.raises(RuntimeError, match="before_save"):
        adapter.state_dict()


# -------------------------------------------------------------------------------- memory per rank

def fsdp_rows(rows: int, rank: int, world: int) -> int:
    """Rows of a dim-0 shard: torch.chunk into pieces of ceil(rows / world)."""
    size = math.ceil(rows / world)
    return max(0, min(rows, (rank + 1) * size) - rank * size)


def test_optimizer_state_bytes_per_rank(two_ranks):
    params = list(make_model().parameters())
    lamb_bytes = 8  # exp_avg + exp_avg_sq, fp32
    full = lamb_bytes * sum(p.numel() for p in params)
    per_rank = {name: [r["state_bytes"][name] for r in two_ranks] for name in ("ddp", "zero1", "zero2", "zero3")}
    assert per_rank["ddp"] == [full, full]
    for name in ("zero2", "zero3"):
        expected = [lamb_bytes * sum(fsdp_rows(p.shape[0], r, 2) * (p.numel() // p.shape[0]) for p in params)
                    for r in range(2)]
        assert per_rank[name] == expected
    assert sum(per_rank["zero1"]) == full and max(per_rank["zero1"]) < full


# -------------------------------------------------------------------------- resharding checkpoints

def dcp_phase(rank: int, world_size: int, root: str, load_from: str | None, done: int, save_to: str,
              more: int, also_equivalence: bool = False) -> dict:
    """zero3 + LAMB: optionally load `load_from` (taken after `done` steps), train to 5 steps, save to
    `save_to`, train `more` steps. Returns the full parameters at each point. `also_equivalence` adds
    the LARS case of DDP and zero2 on this world size (one spawn of 4 ranks serves both checks)."""
    out = {}
    if also_equivalence:
        optim, accum, clip = CASES["lars"]
        out["equivalence"] = {name: run_case(name, optim, accum, clip)[2] for name in ("ddp", "zero2")}
    strategy = make_strategy("zero3", make_model())
    optimizer = make_optimizer(strategy, "zero3", "lamb")
    checkpoint = strategy.sharded_checkpoint(optimizer)
    if load_from is not None:
        checkpoint.load(Path(root, load_from, "dcp"))
        out["loaded"] = full_params(strategy.module)
    train(strategy, optimizer, range(done, 5))
    out["saved"] = full_params(strategy.module)
    # The store's flow: every rank writes into the hidden temp dir, rank 0 renames it into place.
    checkpoint.save(Path(root, ".tmp-" + save_to, "dcp"))
    dist.barrier()
    if rank == 0:
        Path(root, ".tmp-" + save_to).rename(Path(root, save_to))
    dist.barrier()
    train(strategy, optimizer, range(5, 5 + more))
    out["after"] = full_params(strategy.module)
    return out


@pytest.fixture(scope="module")
def four_ranks(two_ranks, dcp_root) -> list[dict]:
    """4 ranks load the 2-rank save ("from2", step 5), save it again ("from4"), train 2 steps."""
    return run_ranks(dcp_phase, 4, str(dcp_root), "from2", 5, "from4", 2, True, timeout_s=240)


@pytest.fixture(scope="module")
def back_to_two(four_ranks, dcp_root) -> dict:
    return run_ranks(dcp_phase, 2, str(dcp_root), "from4", 5, "again2", 2, timeout_s=240)[0]


@pytest.mark.slow
def test_four_ranks_zero2_lars_matches_ddp(four_ranks):
    for rank_out in four_ranks:
        assert_same_params(rank_out["equivalence"]["zero2"]["params"], rank_out["equivalence"]["ddp"]["params"])


@pytest.mark.slow
def test_dcp_saved_on_two_ranks_loads_on_four(two_ranks, four_ranks):
    two, four = two_ranks[0]["dcp"], four_ranks[0]
    for key, value in two["saved"].items():
        assert torch.equal(four["loaded"][key], value)
    # the optimizer state came along too: two more steps on 4 ranks = two more steps on 2 ranks
    assert_same_params(four["after"], two["after"])


@pytest.mark.slow
def test_dcp_saved_on_four_ranks_loads_on_two(four_ranks, back_to_two):
    four = four_ranks[0]
    for key, value in four["saved"].items():
        assert torch.equal(back_to_two["loaded"][key], value)
    assert_same_params(back_to_two["after"], four["after"])


@pytest.mark.slow
def test_dcp_writes_one_file_per_rank_and_metadata(four_ranks, dcp_root):
    assert files_under(dcp_root / "from4", "dcp") == [
        "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/__2_0.distcp", "dcp/__3_0.distcp"]
    assert files_under(dcp_root / "from2", "dcp") == [
        "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"]


def test_dcp_load_from_a_directory_without_checkpoint_fails(tmp_path):
    with pytest.raises(ValueError, match="no DCP checkpoint"):
        DCPCheckpoint({}).load(tmp_path)


# ------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_refuses_trust_ratio_optimizers_when_partitioned(stage, optimizer):
    problems = deepspeed_problems("deepspeed", stage, optimizer)
    assert len(problems) == 1
    assert "#490" in problems[0] and "zero2" in problems[0] and "zero3" in problems[0]


@pytest.mark.parametrize("stage, optimizer", [(0, "lars"), (0, "lamb"), (1, "adamw"), (2, "adam"), (3, "adamw")])
def test_deepspeed_accepts_unpartitioned_or_elementwise(stage, optimizer):
    assert deepspeed_problems("deepspeed", stage, optimizer) == []


def test_deepspeed_problems_checks_stage_and_ignores_other_strategies():
    assert "deepspeed.stage" in deepspeed_problems("deepspeed", 4, "adamw")[0]
    assert deepspeed_problems("zero2", 2, "lamb") == []


def test_zero_problems():
    assert zero_problems("zero3", "lamb") == [] and zero_problems("zero1", "lars") == []
    assert "optim.impl" in zero_problems("zero2", "lamb", impl="apex")[0]
    assert "compression.method" in zero_problems("zero3", "adamw", compression="powersgd")[0]
    assert "noise_scale" in zero_problems("zero2", "adamw", noise_scale=True)[0]
    assert "schedule_free" in zero_problems("zero1", "schedule_free_adamw")[0]


def test_shard_group_norms_of_nothing():
    assert ShardGroupNorms()([]).numel() == 0


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_deepspeed_strategy_says_how_to_install():
    with pytest.raises(ValueError, match="pip install"):
        DeepSpeedStrategy(make_model(), CPU, stage=2)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_deepspeed_strategy_refuses_lars_lamb_before_initialize(optimizer):
    strategy = DeepSpeedStrategy(make_model(), CPU, stage=2)
    with pytest.raises(ValueError, match="zero2 or zero3"):
        strategy.build_optimizer(OptimConfig(**OPTIMIZERS[optimizer]))
    assert strategy.engine is None


# ------------------------------------------------------------------------------- DeepSpeed, real

def deepspeed_vs_ddp(rank: int, world_size: int, stage: int) -> dict:
    ddp = make_strategy("ddp", make_model())
    ddp_opt = make_optimizer(ddp, "ddp", "adamw")
    out = {"ddp_norms": train(ddp, ddp_opt, range(3), accum=2, grad_clip=0.5)}
    strategy = DeepSpeedStrategy(make_model(), CPU, stage=stage, grad_clip=0.5)
    # built with 5x the LR: the trainer's per-step LR, set below, must be what DeepSpeed applies
    optimizer = strategy.build_optimizer(OptimConfig(**{**OPTIMIZERS["adamw"], "lr": 0.05}))
    share = GLOBAL_BATCH // world_size
    norms = []
    for step in range(3):  # the trainer's loop, with the two strategy hooks DeepSpeed needs
        for group in optimizer.param_groups:
            group["lr"] = OPTIMIZERS["adamw"]["lr"]
        x, y = global_batch(step)
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        for xc, yc in zip(xs.chunk(2), ys.chunk(2)):
            strategy.backward(F.cross_entropy(strategy.model(xc), yc) / 2)
        norms.append(strategy.optimizer_step(optimizer, 0.5))
    out.update(ds_norms=norms, ds=full_params(strategy.module), ddp=full_params(ddp.module))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_deepspeed_stage2_adamw_matches_ddp():
    for rank_out in run_ranks(deepspeed_vs_ddp, 2, 2, timeout_s=280):
        assert_same_params(rank_out["ds"], rank_out["ddp"])
        torch.testing.assert_close(rank_out["ds_norms"], rank_out["ddp_norms"], rtol=1e-5, atol=0)
