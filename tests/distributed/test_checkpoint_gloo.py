"""Checkpoints across 2 gloo ranks: per-rank RNG files go back to their own rank, replicated state is
written once (by rank 0), meta.json records the world size."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from bigbatch.checkpoint.stateful import Counters, RNGState
from bigbatch.checkpoint.store import (find_latest_valid, load_checkpoint, prune_checkpoints,
                                       save_checkpoint)
from bigbatch.testing import run_ranks

pytestmark = pytest.mark.distributed


def seed_all(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def draw() -> list:
    return [random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist()]


def save_and_restore(rank: int, world_size: int, root: str) -> dict:
    root = Path(root)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)  # same init on every rank, like a replicated model
    seed_all(100 + rank)           # per-rank streams, like per-rank dropout
    # 'counters' differs by rank on purpose: whatever every rank loads back is what was written.
    replicated = {"model": model, "counters": Counters(step=3, samples=48, writer=rank)}
    for step in (3, 6, 6):  # 6 twice: re-saving a step replaces it across ranks
        path = save_checkpoint(root, step, 16 * step, replicated, {"rng": RNGState()}, rank=rank,
                               world_size=world_size, meta_extra={"strategy": "ddp"},
                               files_extra={"config.yaml": "run: {}\n"}, barrier=dist.barrier)
    if rank == 0:
        prune_checkpoints(root, keep_last=1)
    dist.barrier()
    expected = draw()

    seed_all(999)
    counters = Counters()
    found = find_latest_valid(root)
    meta = load_checkpoint(found, {"counters": counters}, {"rng": RNGState()}, rank=rank,
                           world_size=world_size)
    return {"path": str(path), "found": str(found), "restored": draw() == expected, "draws": expected,
            "writer": counters.writer, "meta": meta}


def test_two_ranks_save_per_rank_rng_and_replicated_once(tmp_path):
    results = run_ranks(save_and_restore, 2, str(tmp_path))
    path = Path(results[0]["path"])
    assert [r["found"] for r in results] == [str(path)] * 2 and path.name == "step-00000006"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000006"]
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "meta.json", "rank-00000.pt",
                                                      "rank-00001.pt", "replicated.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6 and meta["strategy"] == "ddp"
    assert all(r["restored"] for r in results)             # each rank got its own streams back
    assert results[0]["draws"] != results[1]["draws"]      # ... which really were different
    assert [r["writer"] for r in results] == [0, 0]        # replicated.pt came from rank 0 only


def test_two_rank_checkpoint_loads_in_one_process_without_per_rank_state(tmp_path):
    run_ranks(save_and_restore, 2, str(tmp_path))
    counters, rng = Counters(), RNGState()
    before = rng.state_dict()["torch"]
    meta = load_checkpoint(find_latest_valid(tmp_path), {"counters": counters}, {"rng": rng},
                           rank=0, world_size=1)
    assert meta["world_size"] == 2 and counters.step == 3
    assert torch.equal(torch.get_rng_state(), before)  # per-rank RNG of a 2-rank run not applied
    with pytest.raises(ValueError, match="saved by 2 rank"):
        load_checkpoint(find_latest_valid(tmp_path), {}, {"rng": rng}, rank=0, world_size=1, strict=True)
