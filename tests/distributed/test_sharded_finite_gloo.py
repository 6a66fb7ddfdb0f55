"""meta.json's `finite` for sharded (zero2/zero3, DCP) checkpoints on 2 gloo ranks.

Under zero2/zero3 the model and optimizer are saved by every rank into step-N/dcp/, each rank holding
only its shard, so no single rank can tell whether they are finite. Each rank checks its own shard and
one all-reduce combines the answers: a NaN in one rank's shard makes the checkpoint non-finite for
every rank, and pruning and `resume: auto` then treat it as they treat a non-finite replicated one
(tests/reliability/test_divergence.py): keep the newest finite checkpoint, resume from it.

One spawn runs the whole scenario (ranks are expensive to start on a busy machine); the tests check
what each rank recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from bigbatch.checkpoint.manager import CheckpointManager
from bigbatch.checkpoint.stateful import Counters
from bigbatch.checkpoint.store import is_finite, save_checkpoint
from bigbatch.config import CheckpointConfig, OptimConfig
from bigbatch.distributed.zero import ShardedStrategy
from bigbatch.launch.runtime import Runtime
from bigbatch.models.mlp import MLP
from bigbatch.testing import run_ranks

pytestmark = pytest.mark.distributed

CPU = torch.device("cpu")
NAN_RANK = 1  # the only rank whose shard of a weight gets a NaN


def train_step(strategy, optimizer, rank: int, world_size: int) -> None:
    """One step on this rank's share of a fixed batch, so the optimizer holds state to save."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    share = len(x) // world_size
    F.cross_entropy(strategy.model(x[rank * share:(rank + 1) * share]),
                    y[rank * share:(rank + 1) * share]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_params(module) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def views(root: Path) -> dict[str, bool | None]:
    """This rank's reading of every checkpoint's meta.json `finite` (None: not recorded)."""
    return {p.name: json.loads((p / "meta.json").read_text()).get("finite")
            for p in sorted(root.iterdir()) if p.name.startswith("step-")}


def finite_scenario(rank: int, world_size: int, run_dir: str, stage: int) -> dict:
    torch.manual_seed(0)
    strategy = ShardedStrategy(MLP((8,), 3, [16, 16]), CPU, stage=stage)
    optimizer = strategy.build_optimizer(OptimConfig(name="adamw", lr=0.01))
    train_step(strategy, optimizer, rank, world_size)
    messages: list[str] = []
    manager = CheckpointManager(
        CheckpointConfig(keep_last=1, resume="auto"), Path(run_dir),
        Runtime(rank=rank, world_size=world_size, local_rank=rank, device=CPU, backend="gloo"),
        replicated={"counters": Counters()}, per_rank={}, meta_extra={"run_id": "r"}, config_text="",
        log=messages.append, sharded=strategy.sharded_checkpoint(optimizer))
    root, out = manager.root, {}

    manager.save(1, 8)
    saved_at_1 = full_params(strategy.module)
    out["after_1"] = views(root)

    weight = next(strategy.module.parameters())  # blocks' first weight, 16 rows: 8 on each rank
    with torch.no_grad():
        if rank == NAN_RANK:
            weight.to_local()[0, 0] = float("nan")  # this rank's shard only
    out["local_finite"] = bool(torch.isfinite(weight.to_local()).all())
    manager.save(2, 16)
    out["after_2"] = views(root)
    out["is_finite_2"] = is_finite(root / "step-00000002")
    out["latest_after_2"] = manager.latest(log=lambda _: None).name

    meta = manager.resume()  # resume: auto passes over step 2 (NaN) and loads step 1
    out["resumed_step"] = meta["step"]
    out["restored"] = all(torch.equal(v, saved_at_1[k]) for k, v in full_params(strategy.module).items())

    # Now the optimizer: a NaN in rank 0's shard of Adam's first moment makes step 3 non-finite, and
    # pruning (keep_last 1) keeps step 3 (newest) and step 1 (newest finite), not step 2.
    state = optimizer.state[weight]
    with torch.no_grad():
        if rank == 0:
            state["exp_avg"].to_local()[-1, -1] = float("nan")
    manager.save(3, 24)
    out["after_3"] = views(root)
    out["messages"] = messages
    dist.barrier()
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def ranks(request, tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp(f"zero{request.param}")
    return run_ranks(finite_scenario, 2, str(run_dir), request.param, timeout_s=240)


def test_finite_shards_record_finite_true(ranks):
    assert [r["after_1"] for r in ranks] == [{"step-00000001": True}] * 2


def test_a_nan_in_one_ranks_shard_is_non_finite_on_every_rank(ranks):
    assert [r["local_finite"] for r in ranks] == [True, False]  # only rank 1's shard held the NaN
    assert [r["after_2"] for r in ranks] == [{"step-00000001": True, "step-00000002": False}] * 2
    assert [r["is_finite_2"] for r in ranks] == [False, False]
    assert [r["latest_after_2"] for r in ranks] == ["step-00000001"] * 2


def test_resume_auto_passes_over_the_non_finite_checkpoint(ranks):
    assert [r["resumed_step"] for r in ranks] == [1, 1]
    assert all(r["restored"] for r in ranks)  # the NaN is gone: the shards of step 1 are back
    messages = ranks[0]["messages"]
    assert any("step-00000002: its model or optimizer state is not finite" in m for m in messages)
    assert any("resumed from" in m and "step-00000001" in m for m in messages)


def test_a_nan_in_optimizer_state_is_non_finite_and_pruning_keeps_the_newest_finite(ranks):
    # keep_last 1 would leave only step 3; step 1 stays as the newest finite one, step 2 goes.
    assert [r["after_3"] for r in ranks] == [{"step-00000001": True, "step-00000003": False}] * 2


class FakeSharded:
    dirname = "fake"

    def save(self, directory) -> dict:
        Path(directory).mkdir()
        (Path(directory) / "x").write_text("x")
        return {"model": {"w": torch.ones(2)}}


def test_sharded_save_on_several_ranks_needs_all_ranks(tmp_path):
    with pytest.raises(ValueError, match="all_ranks"):
        save_checkpoint(tmp_path, 1, 1, {}, {}, rank=0, world_size=2, barrier=lambda: None,
                        sharded=FakeSharded(), finite_keys=("model",))
    assert not any(tmp_path.iterdir())  # nothing was written


def test_one_rank_sharded_save_checks_its_states_without_a_collective(tmp_path):
    path = save_checkpoint(tmp_path, 1, 1, {}, {}, rank=0, world_size=1, sharded=FakeSharded(),
                           finite_keys=("model",))
    assert json.loads((path / "meta.json").read_text())["finite"] is True
