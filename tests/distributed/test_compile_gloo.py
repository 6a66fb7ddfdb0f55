"""Issue 19 item 3: model.compile (torch.compile, inductor on CPU) trains like the eager model under
ddp, zero1, zero2, zero3 and DiLoCo on 2 gloo ranks, with and without remat, and its checkpoints load
into eager runs and back (state-dict keys without `_orig_mod.`). Compiling on 2 CPU cores takes tens of
seconds per run, so the models are tiny and the tests are marked slow."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch.checkpoint.rundir import open_run, release_run_dir
from bigbatch.launch.runtime import Runtime
from bigbatch.testing import run_ranks
from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from tests.conftest import tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 20
GPT = {"name": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32}


def train(rank: int, world_size: int, raw: dict) -> dict:
    runtime = Runtime(rank, world_size, rank, torch.device("cpu"), "gloo" if world_size > 1 else None)
    cfg = validate_config(raw)
    trainer = build_trainer(cfg, runtime)
    open_run(cfg, runtime, trainer.checkpointer)  # resumes as `bigbatch train` does, config check included
    try:
        trainer.fit()
    finally:
        trainer.metrics.close()
        release_run_dir(cfg.run_dir)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in rows if r.get("kind", "train") == "train"],
            "compiled": trainer.strategy.module._compiled_call_impl is not None,
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "keys": sorted(trainer.strategy.module.state_dict())}


def config(tmp_path, name: str, compiled: bool, strategy: str, remat: str = "none", steps: int = STEPS,
           model: dict | None = None, data: dict | None = None, at_end: bool = False) -> dict:
    return tiny_config(tmp_path, run={"name": name, "max_steps": steps, "deterministic": False},
                       model={**(model or {"name": "mlp", "hidden": [16, 16]}), "compile": compiled},
                       data=data or {}, distributed={"strategy": strategy},
                       diloco={"replicas": 2, "inner_steps": 5}, remat={"policy": remat},
                       optim={"name": "adamw", "lr": 0.01}, eval={"at_end": False},
                       checkpoint={"at_end": at_end})


def token_data(tmp_path) -> dict:
    path = tmp_path / "tokens.bin"
    (torch.arange(20_000) * 5 % 64).to(torch.int16).numpy().tofile(path)  # learnable: next = previous + 5
    return {"name": "tokens", "path": str(path), "seq_len": 16, "vocab_size": 64}


def assert_close_losses(compiled: list[float], eager: list[float]) -> None:
    assert len(compiled) == len(eager) == STEPS
    # inductor fuses and reorders float arithmetic: equal up to float32 rounding, grown over 20 steps
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    assert eager[-1] < eager[0]  # not vacuous: the model trained


@pytest.mark.parametrize("strategy,remat", [("ddp", "none"), ("ddp", "full"), ("zero1", "none"),
                                            ("zero2", "none"), ("zero3", "every_k"), ("diloco", "none")])
def test_compiled_mlp_matches_eager_on_two_ranks(tmp_path, strategy, remat):
    results = {}
    for compiled in (False, True):
        raw = config(tmp_path, f"{strategy}-{compiled}", compiled, strategy, remat)
        results[compiled] = run_ranks(train, 2, raw, timeout_s=600)[0]
    assert_compiled_like_eager(results[True], results[False])


def assert_compiled_like_eager(compiled: dict, eager: dict) -> None:
    assert compiled["compiled"] and compiled["graphs"] > 0  # forward ran through inductor graphs
    assert not eager["compiled"] and eager["graphs"] == 0
    assert compiled["keys"] == eager["keys"] and not any("_orig_mod" in key for key in compiled["keys"])
    assert_close_losses(compiled["losses"], eager["losses"])


@pytest.mark.parametrize("strategy,remat", [("ddp", "selective"), ("zero3", "full")])
def test_compiled_gpt_matches_eager_on_two_ranks(tmp_path, strategy, remat):
    data = token_data(tmp_path)
    results = {compiled: run_ranks(train, 2, config(tmp_path, f"gpt-{strategy}-{compiled}", compiled, strategy,
                                                    remat, model=GPT, data=data), timeout_s=600)[0]
               for compiled in (False, True)}
    assert_compiled_like_eager(results[True], results[False])


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])  # replicated.pt, and DCP shards in step-N/dcp/
def test_checkpoints_are_interchangeable_between_compiled_and_eager(tmp_path, strategy):
    # 10 steps one way, checkpoint, 10 more the other way (model.compile may change on resume): the
    # losses follow the uninterrupted eager run.
    eager = run_ranks(train, 2, config(tmp_path, "eager", False, strategy), timeout_s=600)[0]
    for first in (True, False):
        name = f"from-{'compiled' if first else 'eager'}"
        run_ranks(train, 2, config(tmp_path, name, first, strategy, steps=STEPS // 2, at_end=True), timeout_s=600)
        resumed = run_ranks(train, 2, config(tmp_path, name, not first, strategy), timeout_s=600)[0]
        assert resumed["compiled"] is not first
        assert_close_losses(resumed["losses"], eager["losses"])
