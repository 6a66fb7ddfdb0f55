"""Kill a 2-rank run with SIGKILL at a random step, resume it, and get bitwise the same losses."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest

from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

pytestmark = pytest.mark.e2e

STEPS, EVERY = 12, 3


def losses(run_dir) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if r.get("kind", "train") == "train"]


def run(tmp_path, name: str, batch: dict, die_at: int, kill_rank: int = 1, extra: dict | None = None):
    model = {"name": "tests.custom_components:DyingMLP",
             "kwargs": {"d_in": 8, "classes": 3, "die_rank": kill_rank, "die_at": die_at}}
    extra = dict(extra or {})
    optim = {"name": "adamw", "lr": 0.01, **extra.pop("optim", {})}
    raw = tiny_config(tmp_path, run={"name": name, "max_steps": STEPS}, batch=batch, model=model,
                      optim=optim, lr={"name": "cosine", "warmup_samples": 32},
                      checkpoint={"every_steps": EVERY, "keep_last": 2}, **extra)
    config = write_config(tmp_path / f"{name}.yaml", raw)
    # The kill switch (model.kwargs.die_at) differs between a killed run and its resume: opt in.
    return bigbatch("launch", "--nproc-per-node", "2", str(config), "--set", "distributed.timeout_s=60",
                    "--set", "checkpoint.allow_config_change=true")


BATCHES = {
    "plain": {"global_batch": 16},
    "powersgd": {"global_batch": 16},  # with PowerSGD compression: error feedback is per-rank state
    "powersgd_int8": {"global_batch": 16},  # P and Q as int8 codes: all-gathered, summed in rank order
    "powersgd_target": {"global_batch": 16},  # the rank chosen by compression.target_ratio (rank 2 here)
    "diloco": {"global_batch": 16},    # DiLoCo, 2 replicas, H=4: checkpoints every 3 land mid-cycle
    "diloco_powersgd_int8": {"global_batch": 16},  # pseudo-gradients through PowerSGD with int8 factors
    "accumulation": {"global_batch": 16, "micro_batch": 4},  # 2 micro-batches per rank
    "zero1": {"global_batch": 16, "micro_batch": 4},  # optimizer state gathered on rank 0 to save
    "zero3": {"global_batch": 16},     # FSDP2 shards: model and optimizer in step-N/dcp/
    "deepspeed": {"global_batch": 16},  # ZeRO-2 partitions in DeepSpeed's own files, step-N/deepspeed/
    "soap": {"global_batch": 16},       # heavyball's SOAP: preconditioners in its own state-dict layout
    # SOAP under zero1, resumed from step 9: an odd step, so heavyball's preconditioner-refresh counter
    # (every 2nd step, outside ZeRO's consolidated state) must come back with the checkpoint
    "soap_zero1": {"global_batch": 16, "micro_batch": 4},
    "ramp": {"global_batch": 32, "schedule": {"kind": "ramp", "start": 8, "increment": 8,
                                               "ramp_samples": 96}},
}


@pytest.mark.parametrize("kind", list(BATCHES))
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, kind):
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install '.[deepspeed]')")
    if kind.startswith("soap") and importlib.util.find_spec("heavyball") is None:
        pytest.skip("heavyball is not installed (pip install '.[soap]')")
    batch = BATCHES[kind]
    accum = 2 if "micro_batch" in batch else 1
    kill_step = random.Random(kind).randint(EVERY + 1, STEPS - 1)
    extra = {
        # rank 2 (rank 1 hid it): BLAS rounding depends on operand alignment and DDP rebuilds its
        # buckets after a run's first step, so PowerSGD must not multiply views into the bucket
        "powersgd": {"compression": {"method": "powersgd", "rank": 2, "start_step": 2,
                                     "min_compression_rate": 1.0}},
        "powersgd_int8": {"compression": {"method": "powersgd", "rank": 2, "start_step": 2,
                                          "min_compression_rate": 1.0, "factor_bits": 8}},
        # DyingMLP's 780 B of gradients at ratio 1.8 (433 B): rank 2 sends 420 B, rank 3 556 B
        "powersgd_target": {"compression": {"method": "powersgd", "target_ratio": 1.8, "start_step": 2,
                                            "min_compression_rate": 1.0}},
        "zero1": {"distributed": {"strategy": "zero1"}},
        "soap": {"optim": {"name": "soap", "betas": [0.9, 0.95]}},
        "soap_zero1": {"optim": {"name": "soap", "betas": [0.9, 0.95]}, "distributed": {"strategy": "zero1"}},
        "zero3": {"distributed": {"strategy": "zero3"}},
        "deepspeed": {"distributed": {"strategy": "deepspeed"}, "deepspeed": {"stage": 2}},
        "diloco": {"distributed": {"strategy": "diloco"},
                   "diloco": {"replicas": 2, "inner_steps": 4, "compression": {"method": "fp16"}}},
        "diloco_powersgd_int8": {"distributed": {"strategy": "diloco"},
                                 "diloco": {"replicas": 2, "inner_steps": 4,
                                            "compression": {"method": "powersgd", "rank": 2, "factor_bits": 8,
                                                            "min_compression_rate": 1.0}}},
    }.get(kind)
    reference = run(tmp_path, "reference", batch, die_at=0, extra=extra)
    assert reference.returncode == 0, reference.stderr[-3000:]

    # Rank 1 dies on the first micro-batch of kill_step; the newest checkpoint is older than that.
    killed = run(tmp_path, "resumed", batch, die_at=(kill_step - 1) * accum + 1, extra=extra)
    assert killed.returncode != 0
    resumed = run(tmp_path, "resumed", batch, die_at=0, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    expected = losses(tmp_path / "runs" / "reference")
    assert [s for s, _, _ in expected] == list(range(1, STEPS + 1))
    assert losses(tmp_path / "runs" / "resumed") == expected  # bitwise: same floats, no duplicate step


def test_invalid_explicit_resume_path_exits_2(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    result = bigbatch("train", str(config), "--set", f"checkpoint.resume={tmp_path / 'step-00000003'}")
    assert result.returncode == 2
    assert "checkpoint.resume" in result.stderr
    assert not (tmp_path / "runs" / "tiny" / "config.yaml").exists()
