"""GPU readiness: the same CLI runs on CUDA (NCCL with 2 GPUs) as on CPU. Skipped without CUDA.

Run on a GPU node with `make test-gpu` (or `pytest -m gpu tests/gpu`). Two-rank tests need two GPUs;
the rest need one. Tolerances are looser than on CPU: cuBLAS sums in another order than one process.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
LAMB = {"name": "lamb", "lr": 0.02, "weight_decay": 0.01}


def train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == "train"]


def run(tmp_path, name: str, ranks: int = 1, steps: int = 6, env: dict | None = None, **sections) -> list[dict]:
    sections.setdefault("model", {"hidden": [64, 64]})
    raw = tiny_config(tmp_path, run={"name": name, "max_steps": steps}, checkpoint={"every_steps": 3}, **sections)
    config = write_config(tmp_path / f"{name}.yaml", raw)
    args = ("launch", "--nproc-per-node", str(ranks), str(config)) if ranks > 1 else ("train", str(config))
    result = bigbatch(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_rows(tmp_path / "runs" / name)


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


@two_gpus
def test_nccl_ddp_matches_one_gpu(tmp_path):
    # 16 samples per step: one GPU takes all 16, each of two ranks 8; the averaged gradient is the same
    one = run(tmp_path, "one")
    two = run(tmp_path, "two", ranks=2)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


def test_bf16_autocast_trains(tmp_path):
    rows = run(tmp_path, "bf16", precision="bf16", optim=LAMB)
    assert all(torch.isfinite(torch.tensor(losses(rows)))) and rows[-1]["loss"] < rows[0]["loss"]


@two_gpus
def test_zero3_lamb_matches_ddp(tmp_path):
    ddp = run(tmp_path, "ddp", ranks=2, optim=LAMB)
    zero3 = run(tmp_path, "zero3", ranks=2, optim=LAMB, distributed={"strategy": "zero3"})
    assert losses(zero3) == pytest.approx(losses(ddp), rel=1e-4)


@two_gpus
def test_powersgd_on_cuda_tensors(tmp_path):
    rows = run(tmp_path, "psgd", ranks=2, compression={"method": "powersgd", "rank": 2, "start_step": 2})
    assert rows[-1]["comm_savings"] > 1 and rows[-1]["loss"] < rows[0]["loss"]


def test_remat_keeps_losses_on_cuda(tmp_path):
    plain = run(tmp_path, "plain")
    remat = run(tmp_path, "remat", remat={"policy": "full"})
    assert losses(remat) == pytest.approx(losses(plain), rel=1e-5)


def test_checkpoint_saved_on_gpu_resumes_on_cpu(tmp_path):
    gpu = run(tmp_path, "moved", steps=3)
    resumed = run(tmp_path, "moved", steps=6, env={"CUDA_VISIBLE_DEVICES": ""})  # the same run dir, on CPU
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6] and losses(resumed)[:3] == losses(gpu)
    assert all(torch.isfinite(torch.tensor(losses(resumed))))
