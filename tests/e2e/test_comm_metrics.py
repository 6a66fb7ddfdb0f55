"""Byte accounting in a real 2-rank run: metrics rows carry bytes per kind and the savings ratio."""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

pytestmark = pytest.mark.e2e


def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == "train"]


def test_powersgd_run_counts_bytes_and_noise_scale(tmp_path):
    # MLP 8 -> 32 -> 3. Weight 32x8 compresses at rank 1 (256 > (32+8)·1 = 40 floats); the 3x32 head
    # (96 vs 35) too; biases (32 + 3) go uncompressed. Before start_step=3 everything is all-reduced.
    raw = tiny_config(tmp_path, model={"hidden": [32]}, run={"max_steps": 6},
                      compression={"method": "powersgd", "rank": 1, "start_step": 3, "min_compression_rate": 1.5},
                      metrics={"noise_scale": True, "noise_scale_ema": 0.5})
    result = bigbatch("launch", "--nproc-per-node", "2", str(write_config(tmp_path / "c.yaml", raw)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = train_rows(tmp_path / "runs" / "tiny")
    params = 32 * 8 + 32 + 3 * 32 + 3
    for row in rows:
        assert row["comm_bytes/uncompressed"] == 4 * params
    plain, compressed = rows[1], rows[4]   # step 2 (before start_step), step 5
    assert plain["comm_bytes/grad_allreduce"] == 4 * params
    assert compressed["comm_bytes/powersgd_p"] == 4 * (32 + 3)      # P: n×r for each matrix
    assert compressed["comm_bytes/powersgd_q"] == 4 * (8 + 32)      # Q: m×r
    assert compressed["comm_bytes/powersgd_uncompressed"] == 4 * (32 + 3)
    assert compressed["comm_savings"] == pytest.approx(params / (35 + 40 + 35))
    # The estimate is logged once the smoothed |G|² is positive (it can be negative on tiny batches).
    noise = [r["noise_scale"] for r in rows if "noise_scale" in r]
    assert noise and all(v > 0 for v in noise)


def test_target_ratio_chooses_the_rank_from_the_model(tmp_path):
    # MLP 8 -> 64 -> 64 -> 3: 4931 floats, 19,724 B. Every compressed step must send >= 5x fewer (3,944 B).
    # Rank 3: P 4·(64+64)·3 = 1536, Q 4·(8+64)·3 = 864; the 3x64 head goes plain (rank 2 or more does not
    # shrink it 2x) with the biases: 4·(192+131) = 1292. Total 3692 B. Rank 4 sends the 64x8 matrix plain
    # too: 5388 B, over the budget.
    raw = tiny_config(tmp_path, model={"hidden": [64, 64]}, run={"max_steps": 3},
                      compression={"method": "powersgd", "target_ratio": 5, "start_step": 1})
    result = bigbatch("launch", "--nproc-per-node", "2", str(write_config(tmp_path / "c.yaml", raw)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compression: PowerSGD rank 3 (target_ratio 5): 3,692 B a compressed step" in result.stdout
    last = train_rows(tmp_path / "runs" / "tiny")[-1]
    assert (last["comm_bytes/powersgd_p"], last["comm_bytes/powersgd_q"]) == (1536, 864)
    assert last["comm_bytes/powersgd_uncompressed"] == 1292


def test_unreachable_target_ratio_exits_2_before_anything_is_written(tmp_path):
    # MLP 8 -> 16 -> 3, 780 B of gradients: rank 1 sends 96 + 76 B of factors and 76 B of biases, 3.1x.
    raw = tiny_config(tmp_path, compression={"method": "powersgd", "target_ratio": 100})
    result = bigbatch("launch", "--nproc-per-node", "2", str(write_config(tmp_path / "c.yaml", raw)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = {line for line in result.stderr.splitlines() if "out of reach" in line}  # ranks say the same
    assert line.endswith("compression.target_ratio: 100 is out of reach for this model: rank 1 sends 3.1x fewer "
                         "bytes than the all-reduce (76 B of it in tensors sent plain: biases, norms and small "
                         "matrices); set target_ratio <= 3.1")
    assert not (tmp_path / "runs").exists()


def test_adaptive_batch_grows_and_lr_follows_the_scaling_rule(tmp_path):
    # Noise scales on this problem are in the tens; factor 8 asks for hundreds, clamped to max 64.
    raw = tiny_config(tmp_path, run={"max_steps": 12},
                      batch={"global_batch": 16, "adaptive": {"enabled": True, "factor": 8.0, "max": 64,
                                                              "every_samples": 32}},
                      optim={"name": "sgd", "lr": 0.1, "lr_scaling": {"rule": "linear", "base_batch": 16}},
                      metrics={"noise_scale_ema": 0.5})
    result = bigbatch("launch", "--nproc-per-node", "2", str(write_config(tmp_path / "c.yaml", raw)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = train_rows(tmp_path / "runs" / "tiny")
    batches = [r["global_batch"] for r in rows]
    assert batches == sorted(batches) and batches[-1] > 16  # grew, never shrank
    assert all(b % 2 == 0 and b <= 64 for b in batches)     # splits over 2 ranks, clamped
    for row in rows:  # constant schedule: LR = 0.1 × B / 16 (linear rule)
        assert row["lr"] == pytest.approx(0.1 * row["global_batch"] / 16)
    assert rows[-1]["samples"] == sum(batches)  # the sampler consumed exactly the scheduled samples
