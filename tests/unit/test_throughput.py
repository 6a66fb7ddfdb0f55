"""Model FLOPs per token, tokens/s and MFU: the formula against a hand count, the arithmetic of a row."""

from __future__ import annotations

import json

import pytest

from bigbatch.commands.report import throughput_summary
from bigbatch.memory.planner import GPTSpec
from bigbatch.metrics import Throughput, gpu_key, peak_flops_problems, rate_text, resolve_peak_flops
from bigbatch.models.flops import gpt_flops_per_token, model_flops_per_token
from bigbatch.models.gpt import GPT
from tests.byo_components import ShapeAwareMLP, TinyLM


def test_gpt_flops_per_token_matches_a_hand_count():
    # vocab 8, 4 positions, 1 layer, width 4. Parameters:
    #   token table 8x4 = 32 (also the head: tied, counted once), position table 4x4 = 16,
    #   block: ln1 8, ln2 8, qkv 4x12+12 = 60, proj 4x4+4 = 20, fc1 4x16+16 = 80, fc2 16x4+4 = 68 -> 244,
    #   ln_f 8: 300 in all; N = 300 - 16 (the position lookup multiplies nothing) = 284.
    # 6N = 1704; attention 12·L·d·T = 12·1·4·4 = 192 at T = 4, 144 at T = 3.
    model = GPT(vocab_size=8, block_size=4, n_layer=1, n_head=1, d_model=4)
    assert sum(p.numel() for p in model.parameters()) == 300
    assert gpt_flops_per_token(model, 4) == 1896
    assert gpt_flops_per_token(model, 3) == 1848
    assert model_flops_per_token(model, 4) == 1896.0


def test_the_parameter_count_is_the_planners():
    spec = GPTSpec(n_layer=3, d_model=32, n_head=4, vocab_size=65, seq_len=16)
    model = GPT(vocab_size=65, block_size=16, n_layer=3, n_head=4, d_model=32)
    assert gpt_flops_per_token(model, 16) == 6 * (spec.n_params - 16 * 32) + 12 * 3 * 32 * 16


def test_a_custom_model_reports_its_own_flops_or_none():
    assert model_flops_per_token(TinyLM(vocab_size=10, seq_len=5, width=3), 5) == 6.0 * 30
    assert model_flops_per_token(ShapeAwareMLP((4,), 2), 1) is None


def test_tokens_per_second_and_mfu_of_a_row():
    # 4 ranks, 10 sequences/s of 128 tokens: 1280 tokens/s, 320 per rank; 1e6 FLOPs a token against a
    # 1e9 FLOP/s device: 320e6 / 1e9 = 0.32.
    row = {"samples_per_s": 10.0}
    out = Throughput(tokens_per_sample=128, world_size=4, flops_per_token=1e6, peak_flops=1e9)(row)
    assert out == {"tokens_per_s": 1280.0, "tokens_per_s_per_rank": 320.0, "mfu": pytest.approx(0.32)}
    assert "mfu" not in Throughput(128, 4, 1e6, None)(row)  # unknown peak: no MFU, not a guess
    assert "mfu" not in Throughput(128, 4, None, 1e9)(row)
    assert rate_text({**row, **out}) == "1280 tokens/s (320/rank)  MFU 32.00%"
    assert rate_text(row) == "10 samples/s"


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"), ("NVIDIA L40", None), ("NVIDIA A10", "a10"),
    ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None)])
def test_gpu_names_map_to_the_table_or_to_unknown(name, key):
    assert gpu_key(name) == key


def test_peak_flops_resolution():
    assert resolve_peak_flops("auto", "cuda", "NVIDIA H100 80GB HBM3", "bf16")[0] == 989e12
    assert resolve_peak_flops("auto", "cuda", "NVIDIA A100-SXM4-40GB", "fp32")[0] == 19.5e12
    assert resolve_peak_flops("auto", "cpu", None, "fp32") == (None, "peak FLOPs unknown on cpu")
    assert resolve_peak_flops("auto", "cuda", "NVIDIA H100 NVL", "bf16")[0] is None
    assert resolve_peak_flops("a100", "cpu", None, "bf16")[0] == 312e12  # named by hand: taken as said
    assert resolve_peak_flops("5e11", "cpu", None, "fp32")[0] == 5e11    # YAML reads 5e11 as a string
    assert resolve_peak_flops(2.5e12, "cuda", "NVIDIA H100", "bf16")[0] == 2.5e12
    assert resolve_peak_flops("unknown", "cuda", "NVIDIA H100", "bf16")[0] is None


@pytest.mark.parametrize("setting, ok", [("auto", True), ("H100-SXM", True), (989e12, True), ("1e12", True),
                                         ("unknown", True), ("v100", False), (0.0, False), ("-1", False),
                                         ("nan", False)])
def test_peak_flops_validation(setting, ok):
    problems = peak_flops_problems(setting)
    assert (problems == []) is ok
    assert all(p.startswith("metrics.peak_flops: ") for p in problems)


def test_report_summarises_median_throughput_without_the_first_step(tmp_path):
    rows = [{"step": 1, "samples": 4, "samples_per_s": 1.0, "tokens_per_s": 10.0, "tokens_per_s_per_rank": 5.0,
             "mfu": 0.01},
            *({"step": s, "samples": 4 * s, "samples_per_s": 3.0, "tokens_per_s": t, "tokens_per_s_per_rank": t / 2,
               "mfu": t / 1000} for s, t in [(2, 100.0), (3, 300.0), (4, 200.0)]),
            {"kind": "eval", "step": 4, "samples": 16, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert throughput_summary(tmp_path) == "throughput: median 200 tokens/s (100/rank), MFU 20.00% over 3 steps"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": 4, "samples_per_s": 1.0}) + "\n")
    assert throughput_summary(tmp_path) is None  # a classifier: samples/s only
