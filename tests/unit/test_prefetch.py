"""Issue 19 item 4: the next step's batches are gathered in a background thread, and they are the
same batches, in the same order, as when each step gathers its own (exact resume is in
tests/e2e/test_resume.py, which runs with prefetching on, the default for the built-in datasets)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from bigbatch.data.base import TensorSplit
from bigbatch.data.prefetch import PrefetchingBatches, StepBatches, StepKey
from bigbatch.data.sampler import GlobalSampler
from bigbatch.data.text import WindowSplit
from bigbatch.launch.runtime import Runtime
from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def token_split(tmp_path) -> WindowSplit:
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 50_000, size=20_000, dtype=np.uint16).tofile(path)
    return WindowSplit(np.memmap(path, dtype=np.uint16, mode="r"), seq_len=16)


def keys() -> list[StepKey]:
    # Steps of a ramp 8 -> 24 crossing the 1249-window epoch boundary, micro-batches of 4 or 8.
    out, start = [], 1200
    for batch in (8, 8, 16, 16, 24, 24, 24):
        out.append(StepKey(start, batch, 4 if batch < 24 else 8))
        start += batch
    return out


def gathered(batches: StepBatches, steps: list[StepKey], guesses: list[StepKey | None]) -> list:
    out = []
    for key, guess in zip(steps, guesses):
        out.append([tuple(t.clone() for t in pair) for pair in batches.take(key)])
        if guess is not None:
            batches.ahead(guess)
    batches.close()
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_prefetched_batches_equal_gathered_ones_right_or_wrong_guess(tmp_path, rank):
    split = token_split(tmp_path)
    steps = keys()
    right = steps[1:] + [None]
    wrong = [StepKey(k.start + 8, k.batch, k.micro) if i % 3 == 1 else k  # every third guess misses
             for i, k in enumerate(right[:-1])] + [None]
    reference = gathered(StepBatches(split, GlobalSampler(len(split), 5, rank, 2), CPU), steps, right)
    for guesses in (right, wrong):
        got = gathered(PrefetchingBatches(split, GlobalSampler(len(split), 5, rank, 2), CPU), steps, guesses)
        assert len(got) == len(reference)
        for step_got, step_ref in zip(got, reference):
            assert len(step_got) == len(step_ref)
            for (x, y), (rx, ry) in zip(step_got, step_ref):
                assert torch.equal(x, rx) and torch.equal(y, ry)
    # Not vacuous: windows are shifted token runs, and consecutive steps differ.
    x, y = reference[0][0]
    assert torch.equal(x[:, 1:], y[:, :-1]) and not torch.equal(reference[0][0][0], reference[1][0][0])


class ThreadSpySplit(TensorSplit):
    """Records the thread each batch() call runs in."""

    threads: list[str] = []

    def batch(self, indices):
        ThreadSpySplit.threads.append(threading.current_thread().name)
        return super().batch(indices)


def run(tmp_path, name: str, prefetch: bool | None, **sections):
    raw = tiny_config(tmp_path, run={"name": name, "max_steps": 9}, data={"prefetch": prefetch},
                      checkpoint={"at_end": False}, **sections)
    trainer = build_trainer(validate_config(raw), Runtime(0, 1, 0, CPU, None))
    spy = ThreadSpySplit(trainer.data.train.inputs, trainer.data.train.targets)
    trainer.data.train = trainer.batches.split = spy
    ThreadSpySplit.threads = []
    trainer.fit()
    trainer.metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    params = {k: v.clone() for k, v in trainer.strategy.module.state_dict().items()}
    return trainer, [(r.get("step"), r.get("loss"), r.get("grad_norm")) for r in rows], params, ThreadSpySplit.threads


@pytest.mark.parametrize("batch", [{"global_batch": 16, "micro_batch": 4},  # 4 micro-batches a step
                                   {"global_batch": 48, "schedule": {"kind": "ramp", "start": 16, "increment": 16,
                                                                     "ramp_samples": 64}}],
                         ids=["accumulation", "ramp"])
def test_training_is_identical_with_and_without_prefetch(tmp_path, batch):
    on, rows_on, params_on, threads_on = run(tmp_path, "on", True, batch=batch)
    off, rows_off, params_off, threads_off = run(tmp_path, "off", False, batch=batch)
    assert isinstance(on.batches, PrefetchingBatches) and type(off.batches) is StepBatches
    assert rows_on == rows_off
    assert all(torch.equal(params_on[k], params_off[k]) for k in params_off)
    # With prefetching, every step after the first was gathered by the worker (the first has no guess).
    assert len(threads_on) == len(threads_off) and set(threads_off) == {"MainThread"}
    first_step = 4 if "micro_batch" in batch else 1
    assert threads_on.count("MainThread") == first_step
    assert all(t == "MainThread" or t.startswith("bigbatch-prefetch") for t in threads_on)
    assert not any(t.name.startswith("bigbatch-prefetch") for t in threading.enumerate())  # closed


def test_prefetch_is_the_default_for_built_in_data_only(tmp_path):
    raw = tiny_config(tmp_path)
    built_in = build_trainer(validate_config(raw), Runtime(0, 1, 0, CPU, None))
    assert isinstance(built_in.batches, PrefetchingBatches)
    custom = tiny_config(tmp_path, data={"name": "tests.custom_components:build_data"})
    raw_custom = validate_config(custom)
    from bigbatch.training.build import wants_prefetch
    assert wants_prefetch(raw_custom) is False
    raw_custom.data.prefetch = True
    assert wants_prefetch(raw_custom) is True
