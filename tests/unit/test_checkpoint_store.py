"""The checkpoint store: exact resume, meta.json last, corruption detection, kill safety, pruning."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bigbatch.checkpoint.stateful import Counters, RNGState
from bigbatch.checkpoint.store import (all_finite, find_latest_valid, load_checkpoint, prune_checkpoints,
                                       resolve_resume, save_checkpoint, validate_checkpoint)

BATCH = 16


def make_run(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer, Counters()


def train(model, optimizer, counters, steps: int) -> None:
    """Every global stream feeds the step: torch (data, dropout), numpy (input scale), python (LR)."""
    for _ in range(steps):
        x = torch.randn(BATCH, 8) * float(np.random.uniform(0.5, 1.5))
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * random.uniform(0.9, 1.1)
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counters.step += 1
        counters.samples += BATCH


def seed_all(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def save_states(root: Path, step: int, value: float = 0.0, **kwargs) -> Path:
    """A tiny checkpoint whose replicated 'counters' carry `value` (to tell saves apart)."""
    counters = Counters(step=step, samples=step * BATCH, loss=value)
    kwargs.setdefault("meta_extra", {"strategy": "single"})
    return save_checkpoint(root, step, step * BATCH, {"counters": counters}, {"rng": RNGState()},
                           rank=0, world_size=1, **kwargs)


def loaded_value(path: Path) -> float:
    counters = Counters()
    load_checkpoint(path, {"counters": counters}, {}, rank=0, world_size=1)
    return counters.loss


def test_resume_continues_bitwise_identical_to_uninterrupted_run(tmp_path):
    seed_all(0)
    model, optimizer, counters = make_run(0)
    train(model, optimizer, counters, 8)
    expected = [p.detach().clone() for p in model.parameters()]

    seed_all(0)
    model, optimizer, counters = make_run(0)
    train(model, optimizer, counters, 4)
    path = save_checkpoint(tmp_path, counters.step, counters.samples,
                           {"model": model, "optimizer": optimizer, "counters": counters},
                           {"rng": RNGState()}, rank=0, world_size=1, meta_extra={"strategy": "single"},
                           files_extra={"config.yaml": "run:\n  seed: 0\n"})

    seed_all(123)  # a fresh process: other init, other RNG positions, no momentum
    model, optimizer, counters = make_run(123)
    meta = load_checkpoint(resolve_resume(tmp_path, "auto"),
                           {"model": model, "optimizer": optimizer, "counters": counters},
                           {"rng": RNGState()}, rank=0, world_size=1)
    train(model, optimizer, counters, 4)

    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters()))
    assert (counters.step, counters.samples) == (8, 8 * BATCH)
    assert path.name == "step-00000004"
    assert meta["step"] == 4 and meta["samples"] == 4 * BATCH and meta["world_size"] == 1
    assert meta["strategy"] == "single" and meta["bigbatch_version"]
    assert set(meta["files"]) == {"replicated.pt", "rank-00000.pt", "config.yaml"}
    assert (path / "config.yaml").read_text() == "run:\n  seed: 0\n"


def test_directory_without_meta_is_skipped_and_reported(tmp_path):
    save_states(tmp_path, 10, 1.0)
    newest = save_states(tmp_path, 20, 2.0)
    (newest / "meta.json").unlink()
    messages = []
    found = find_latest_valid(tmp_path, log=messages.append)
    assert found == tmp_path / "step-00000010" and loaded_value(found) == 1.0
    assert len(messages) == 1 and "step-00000020" in messages[0] and "missing meta.json" in messages[0]


def test_default_report_goes_to_logging_warning(tmp_path, caplog):
    save_states(tmp_path, 10)
    (save_states(tmp_path, 20) / "meta.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert find_latest_valid(tmp_path) == tmp_path / "step-00000010"
    assert "missing meta.json" in caplog.text


def corrupt_truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def corrupt_flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt, reason", [(corrupt_truncate, "truncated"),
                                             (corrupt_flip_byte, "sha256 mismatch")])
@pytest.mark.parametrize("victim", ["replicated.pt", "rank-00000.pt"])
def test_corrupted_file_falls_back_to_previous_checkpoint(tmp_path, corrupt, reason, victim):
    save_states(tmp_path, 10, 1.0)
    newest = save_states(tmp_path, 20, 2.0)
    corrupt(newest / victim)
    assert reason in validate_checkpoint(newest) and victim in validate_checkpoint(newest)
    messages = []
    assert find_latest_valid(tmp_path, log=messages.append) == tmp_path / "step-00000010"
    assert reason in messages[0]
    with pytest.raises(ValueError, match=reason):  # loading checks the files it reads too
        load_checkpoint(newest, {"counters": Counters()}, {"rng": RNGState()}, rank=0, world_size=1)


def test_validate_reports_each_kind_of_damage(tmp_path):
    path = save_states(tmp_path, 10)
    assert validate_checkpoint(path) is None
    assert "not a directory" in validate_checkpoint(tmp_path / "step-00000099")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    assert "world size 2 missing" in validate_checkpoint(path)
    (path / "meta.json").write_text(json.dumps({**meta, "step": 11}))
    assert "says step 11" in validate_checkpoint(path)
    (path / "meta.json").write_text("{not json")
    assert "unreadable meta.json" in validate_checkpoint(path)
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "rank-00000.pt").unlink()
    assert "missing file rank-00000.pt" in validate_checkpoint(path)


def test_resolve_resume_auto_never_and_paths(tmp_path):
    assert resolve_resume(tmp_path / "absent", "auto") is None
    path = save_states(tmp_path, 10)
    assert resolve_resume(tmp_path, "auto") == path
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, str(path)) == path
    assert resolve_resume(tmp_path, "step-00000010") == path  # relative to the checkpoint root


@pytest.mark.parametrize("damage, reason", [("meta", "missing meta.json"), ("flip", "sha256 mismatch"),
                                            ("absent", "not a directory")])
def test_resolve_resume_invalid_path_names_key_and_reason(tmp_path, damage, reason):
    path = save_states(tmp_path, 10)
    if damage == "meta":
        (path / "meta.json").unlink()
    elif damage == "flip":
        corrupt_flip_byte(path / "replicated.pt")
    else:
        path = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="checkpoint.resume") as err:
        resolve_resume(tmp_path, str(path))
    assert reason in str(err.value)


def test_resave_same_step_replaces_it_and_leaves_nothing_behind(tmp_path):
    save_states(tmp_path, 10, 1.0)
    path = save_states(tmp_path, 10, 2.0)
    assert loaded_value(path) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]


def test_save_rejects_bad_extras_and_missing_barrier(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_states(tmp_path, 1, meta_extra={"step": 3})
    for name in ["meta.json", "../x.yaml", ".hidden", "rank-00003.pt"]:
        with pytest.raises(ValueError, match="plain file name"):
            save_states(tmp_path, 1, files_extra={name: "x"})
    with pytest.raises(ValueError, match="barrier"):
        save_checkpoint(tmp_path, 1, 1, {}, {}, rank=0, world_size=2, meta_extra={})
    assert not any(tmp_path.iterdir())  # nothing was written


# ------------------------------------------------------------------ several ranks, as threads

def save_as_threads(root: Path, world_size: int, step: int) -> None:
    """Each thread plays one rank; a threading.Barrier stands in for the process-group barrier."""
    barrier, errors = threading.Barrier(world_size, timeout=30), []

    def rank_main(rank):
        try:
            save_checkpoint(root, step, step, {"counters": Counters(step=step)},
                            {"counters": Counters(epoch=100 + rank)}, rank=rank, world_size=world_size,
                            meta_extra={}, barrier=barrier.wait)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_world_size_change_skips_per_rank_state_unless_strict(tmp_path, caplog):
    save_as_threads(tmp_path, 2, 5)
    path = find_latest_valid(tmp_path)
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    mine, replicated = Counters(epoch=7), Counters()
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, {"counters": replicated}, {"counters": mine}, rank=0, world_size=1)
    assert replicated.step == 5 and mine.epoch == 7 and "saved by 2 rank(s)" in caplog.text
    with pytest.raises(ValueError, match="saved by 2 rank"):
        load_checkpoint(path, {"counters": replicated}, {"counters": mine}, rank=0, world_size=1, strict=True)
    load_checkpoint(path, {}, {"counters": mine}, rank=1, world_size=2)
    assert mine.epoch == 101  # rank 1 got rank 1's file


def test_missing_state_key_warns_or_raises_when_strict(tmp_path, caplog):
    path = save_states(tmp_path, 3)
    extra = Counters(epoch=4)
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, {"counters": Counters(), "guard": extra}, {}, rank=0, world_size=1)
    assert "no state for ['guard']" in caplog.text and extra.epoch == 4
    with pytest.raises(ValueError, match="no state for"):
        load_checkpoint(path, {"guard": extra}, {}, rank=0, world_size=1, strict=True)


# --------------------------------------------------------------------------- kill mid-save

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from bigbatch.checkpoint import store
    from bigbatch.checkpoint.stateful import Counters, RNGState

    root, step, value, point = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

    def hook(reached):
        if reached == point:
            os.kill(os.getpid(), signal.SIGKILL)

    store._test_hook = hook
    store.save_checkpoint(root, step, step, {"counters": Counters(step=step, loss=value)},
                          {"rng": RNGState()}, rank=0, world_size=1, meta_extra={})
""")


def save_and_die(root: Path, step: int, value: float, point: str) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(root), str(step), str(value), point],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.mark.parametrize("point", ["written", "renamed"])
def test_kill_mid_save_keeps_previous_checkpoint(tmp_path, point):
    save_states(tmp_path, 10, 1.0)
    save_and_die(tmp_path, 20, 2.0, point)
    leftover = tmp_path / (".tmp-step-00000020" if point == "written" else "step-00000020")
    assert leftover.is_dir()
    found = find_latest_valid(tmp_path, log=lambda _: None)
    assert found == tmp_path / "step-00000010" and loaded_value(found) == 1.0

    save_states(tmp_path, 30, 3.0)  # the next save clears leftovers of the killed one ...
    prune_checkpoints(tmp_path, keep_last=5)  # ... and prune removes an unfinished step dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000030"]


@pytest.mark.parametrize("point", ["moved_aside", "renamed"])
def test_kill_while_replacing_a_step_keeps_the_old_copy(tmp_path, point):
    save_states(tmp_path, 10, 1.0)
    save_and_die(tmp_path, 10, 2.0, point)
    found = find_latest_valid(tmp_path, log=lambda _: None)
    assert found == tmp_path / ".old-step-00000010" and loaded_value(found) == 1.0

    path = save_states(tmp_path, 10, 3.0)
    assert find_latest_valid(tmp_path) == path and loaded_value(path) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]


def test_prune_removes_aside_copy_once_step_is_valid_again(tmp_path):
    save_states(tmp_path, 10, 1.0)
    save_and_die(tmp_path, 10, 2.0, "moved_aside")
    save_states(tmp_path, 20, 2.0)
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020"]


# -------------------------------------------------------------------------------------- prune

def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_prune_keeps_newest_k_valid(tmp_path):
    for step in (10, 20, 30, 40):
        save_states(tmp_path, step)
    (tmp_path / ".tmp-step-00000050").mkdir()
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert names(tmp_path) == ["step-00000030", "step-00000040"]
    assert {p.name for p in removed} == {"step-00000010", "step-00000020", ".tmp-step-00000050"}


def test_prune_never_removes_newest_valid_and_keeps_newer_invalid(tmp_path):
    for step in (10, 20, 30):
        save_states(tmp_path, step)
    (save_states(tmp_path, 15) / "meta.json").unlink()   # invalid, older than newest valid: removed
    corrupt_flip_byte(save_states(tmp_path, 40) / "replicated.pt")  # invalid, newer: kept to inspect
    prune_checkpoints(tmp_path, keep_last=1)
    assert names(tmp_path) == ["step-00000030", "step-00000040"]
    assert find_latest_valid(tmp_path, log=lambda _: None) == tmp_path / "step-00000030"


@pytest.mark.parametrize("keep_last", [0, -1])
def test_prune_keep_last_zero_keeps_all_valid(tmp_path, keep_last):
    for step in (10, 20, 30):
        save_states(tmp_path, step)
    (tmp_path / ".tmp-step-00000040").mkdir()
    prune_checkpoints(tmp_path, keep_last=keep_last)
    assert names(tmp_path) == ["step-00000010", "step-00000020", "step-00000030"]


def test_prune_of_missing_or_empty_root_is_a_no_op(tmp_path):
    assert prune_checkpoints(tmp_path / "absent", 3) == []
    assert prune_checkpoints(tmp_path, 3) == []


def test_stale_files_do_not_leak_into_a_new_save(tmp_path):
    stale = tmp_path / ".tmp-step-00000010"
    stale.mkdir()
    (stale / "rank-00007.pt").write_bytes(b"stale")
    path = save_states(tmp_path, 10)
    assert names(path) == ["meta.json", "rank-00000.pt", "replicated.pt"]
    assert os.listdir(tmp_path) == ["step-00000010"]


def test_all_finite_walks_nested_state_and_ignores_integer_tensors():
    state = {"model": {"w": torch.ones(3), "steps": torch.tensor([2**40])},
             "optimizer": {"state": {0: {"exp_avg": torch.zeros(2, dtype=torch.bfloat16)}}, "groups": [{"lr": 0.1}]}}
    assert all_finite(state) and all_finite({}) and all_finite([torch.arange(3)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = {**state, "optimizer": {"state": {0: {"exp_avg": torch.tensor([0.0, bad])}}}}
        assert not all_finite(broken)
    assert not all_finite([[torch.ones(2)], (torch.tensor([1 + 0j, complex(0, float("inf"))]),)])
