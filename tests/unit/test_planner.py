"""The memory planner against measured saved bytes, the ZeRO formulas and micro-batch arithmetic."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from bigbatch.memory.activation import measure_saved_bytes
from bigbatch.models.gpt import GPT
from bigbatch.models.mlp import MLP
from bigbatch.models.resnet import ResNet
from bigbatch.memory.planner import (ActivationEstimate, GPTSpec, MeasuredSpec, RankState, format_plan,
                              largest_micro_batch, optimizer_state_bytes, parse_bytes, plan,
                              rank_state, spec_from_model)
from bigbatch.memory.remat import POLICIES, apply_remat

# (n_layer, d_model, n_head, seq_len, vocab, batch, dropout, precision)
GPT_CASES = [
    (2, 64, 4, 64, 65, 4, 0.0, "fp32"),
    (4, 128, 8, 128, 256, 2, 0.0, "fp32"),
    (3, 96, 4, 80, 100, 3, 0.0, "fp32"),
    (2, 64, 4, 64, 65, 4, 0.1, "fp32"),   # CPU attention dropout: the math path, T×T saved
    (3, 64, 4, 64, 65, 2, 0.0, "bf16"),   # autocast: bf16 matmuls, fp32 residual stream
]


@pytest.mark.parametrize("case", GPT_CASES, ids=lambda c: "L{}-d{}-h{}-T{}-V{}-b{}-p{}-{}".format(*c))
def test_gpt_estimate_within_15_percent_of_measured_at_every_policy(case):
    n_layer, d, heads, t, vocab, batch, dropout, precision = case
    torch.manual_seed(0)
    model = GPT(vocab, t, n_layer, heads, d, dropout)
    idx, targets = torch.randint(0, vocab, (batch, t)), torch.randint(0, vocab, (batch * t,))
    spec = spec_from_model(model, idx)
    assert spec == GPTSpec(n_layer, d, heads, vocab, t, block_size=t, dropout=dropout,
                           attention="math" if dropout else "fused")
    for policy in POLICIES:
        remat = apply_remat(copy.deepcopy(model), policy, k=2)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            measured = measure_saved_bytes(remat, idx, lambda out: F.cross_entropy(
                out.flatten(0, 1), targets))
        estimate = spec.activations(policy, 2, precision).saved(batch)
        assert abs(estimate - measured) <= 0.15 * measured, (policy, estimate, measured)


def test_gpt_parameter_count_matches_the_module():
    # 12·d²·L + 13·d·L (biases, LayerNorms) + V·d (tied: the head IS the token table; the issue's
    # 2·d·V counts an untied head) + T·d (positions) + 2·d (final LayerNorm)
    spec = GPTSpec(n_layer=3, d_model=32, n_head=4, vocab_size=50, seq_len=16)
    model = GPT(50, 16, 3, 4, 32)
    assert spec.n_params == sum(p.numel() for p in model.parameters())
    assert spec.n_params == 12 * 32**2 * 3 + 13 * 32 * 3 + 50 * 32 + 16 * 32 + 2 * 32


@pytest.mark.parametrize("model, inputs", [
    (MLP((10,), 4, [32, 32, 32]), torch.randn(2, 10)),
    (ResNet((3, 8, 8), 5, width=4, blocks=[1, 1]), torch.randn(2, 3, 8, 8)),
], ids=["mlp", "resnet"])
def test_measured_models_scale_linearly_in_batch(model, inputs):
    torch.manual_seed(0)
    spec = MeasuredSpec(model, inputs)
    batch, classes = 6, model.head.out_features
    big = torch.randn(batch, *inputs.shape[1:])
    for policy in POLICIES:
        measured = measure_saved_bytes(apply_remat(copy.deepcopy(model), policy), big)
        loss = batch * (4 * classes + 8)  # the cross-entropy the spec adds: log-softmax + target
        estimate = spec.activations(policy).saved(batch)
        assert abs(estimate - loss - measured) <= 0.15 * measured, (policy, estimate, measured)


def test_a_model_without_blocks_is_planned_without_remat():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    report = plan(MeasuredSpec(model, torch.randn(2, 3, 4)), 1, 10**6)
    assert [a.policy for a in report.activations] == ["none"]
    # Linear saves its input, 12 fp32 per sample; cross-entropy adds 3 fp32 + an int64 target
    assert report.activations[0].per_sample_bytes == 4 * 12 + 4 * 3 + 8


def test_optimizer_state_bytes_per_parameter():
    assert optimizer_state_bytes("adamw") == 8             # exp_avg + exp_avg_sq
    assert optimizer_state_bytes("lamb") == 8
    assert optimizer_state_bytes("sgd", momentum=0.9) == 4  # momentum buffer
    assert optimizer_state_bytes("sgd", momentum=0.0) == 0  # torch keeps none
    assert optimizer_state_bytes("lars") == optimizer_state_bytes("lion") == 4
    assert optimizer_state_bytes("rmsprop", momentum=0.0) == 4
    assert optimizer_state_bytes("schedule_free_adamw") == 8  # z + exp_avg_sq (y only in eval mode)
    with pytest.raises(ValueError, match="optim.name"):
        optimizer_state_bytes("adafactor")


@dataclass(frozen=True)
class FakeSpec:
    """A model with round numbers, to check the arithmetic by hand."""

    n_params: int = 1000
    root_params: int = 100
    max_block_params: int = 300
    name: str = "fake"
    policies: tuple = POLICIES
    act: ActivationEstimate = ActivationEstimate("none", fixed_bytes=500, per_sample_bytes=1000,
                                                 working_fixed_bytes=100, working_per_sample_bytes=200)

    def activations(self, policy, k, precision):
        return ActivationEstimate(policy, *[getattr(self.act, f) for f in (
            "fixed_bytes", "per_sample_bytes", "working_fixed_bytes", "working_per_sample_bytes")])


def test_zero_stages_divide_state_per_rank():
    # n = 1000 parameters, AdamW s = 8 B/param, N = 4 ranks, fp32 params and grads (4 B):
    #   strategy  params       grads        optimizer    comm buffers
    #   ddp       4n    =4000  4n    =4000  8n   =8000   0 (gradients are DDP's bucket views)
    #   zero1     4n    =4000  4n    =4000  8n/N =2000   0
    #   zero2     4n    =4000  4n/N  =1000  8n/N =2000   0
    #   zero3     4n/N  =1000  4n/N  =1000  8n/N =2000   4·(root 100 + 2·block 300) = 2800
    spec, s = FakeSpec(), optimizer_state_bytes("adamw")
    assert rank_state("ddp", spec, 4, s) == RankState("ddp", 4000, 4000, 8000, 0)
    assert rank_state("zero1", spec, 4, s) == RankState("zero1", 4000, 4000, 2000, 0)
    assert rank_state("zero2", spec, 4, s) == RankState("zero2", 4000, 1000, 2000, 0)
    assert rank_state("zero3", spec, 4, s) == RankState("zero3", 1000, 1000, 2000, 2800)
    # N = 3 does not divide: each shard rounds up, 4000/3 → 1334, 8000/3 → 2667
    assert rank_state("zero3", spec, 3, s) == RankState("zero3", 1334, 1334, 2667, 2800)
    # without gradient_as_bucket_view DDP keeps flat buckets as large as all gradients: 4n
    assert rank_state("ddp", spec, 4, s, ddp_bucket_view=False).comm_buffers == 4000
    with pytest.raises(ValueError, match="distributed.strategy"):
        rank_state("diloco", spec, 4, s)


def test_weight_average_is_whole_under_ddp_and_zero1_and_sharded_under_zero2_and_zero3():
    # an ema: average is float32 like the parameters: 4n = 4000 bytes, this rank's shards under FSDP
    spec, s = FakeSpec(), optimizer_state_bytes("adamw")
    averages = {st: rank_state(st, spec, 4, s, weight_average=True).average for st in ("ddp", "zero1", "zero2", "zero3")}
    assert averages == {"ddp": 4000, "zero1": 4000, "zero2": 1000, "zero3": 1000}
    with_average = rank_state("zero3", spec, 4, s, weight_average=True)
    assert with_average.total == rank_state("zero3", spec, 4, s).total + 1000
    report = plan(spec, 4, 10**6, optimizer="adamw", weight_average=True)
    assert "weight average" in format_plan(report) and "weight average" not in format_plan(plan(spec, 4, 10**6))


def test_largest_micro_batch_is_the_last_that_fits():
    # state 10_000; peak(b) = (500 + 100) + b·(1000 + 200) → b ≤ (25_000 − 10_600) / 1200 = 12.0
    state = RankState("ddp", 4000, 4000, 2000, 0)
    act = FakeSpec().act
    assert largest_micro_batch(state, act, usable_bytes=25_000) == 12
    assert state.total + act.peak(12) == 25_000            # exactly full
    assert largest_micro_batch(state, act, usable_bytes=24_999) == 11
    assert largest_micro_batch(state, act, usable_bytes=11_799) == 0   # b = 1 needs 11_800


def test_plan_grid_and_selection():
    spec = FakeSpec()
    # ddp state = 4000 + 4000 + 8000 + 0 = 16_000; usable = 0.5 · 80_000 = 40_000
    # b ≤ (40_000 − 16_000 − 600) / 1200 = 19.5 → 19
    report = plan(spec, world_size=4, device_memory_bytes=80_000, optimizer="adamw",
                  usable_fraction=0.5, strategy="ddp", policy="full", micro_batch=20)
    assert report.usable_bytes == 40_000
    assert report.max_micro_batch["ddp"]["full"] == 19
    # zero3 state = 1000 + 1000 + 2000 + 2800 = 6800 → (40_000 − 6800 − 600) / 1200 = 27.2 → 27
    assert report.max_micro_batch["zero3"]["none"] == 27
    assert report.selection.largest == 19
    assert report.selection.peak_bytes == 16_000 + 600 + 20 * 1200
    text = format_plan(report)
    assert "largest micro-batch per rank" in text and "micro-batch 20 does NOT fit" in text


def test_remat_raises_the_largest_gpt_micro_batch():
    spec = GPTSpec(n_layer=24, d_model=1024, n_head=16, vocab_size=50304, seq_len=1024)
    report = plan(spec, world_size=8, device_memory_bytes=parse_bytes("80GB"), optimizer="adamw")
    row = report.max_micro_batch["zero1"]
    assert row["full"] > row["every_k"] > row["none"] > 0 and row["selective"] > row["none"]
    assert "zero3" in format_plan(report)


def test_bad_inputs_name_what_to_change():
    with pytest.raises(ValueError, match="precision"):
        GPTSpec(2, 8, 2, 10, 4).activations("none", 2, "fp16")
    with pytest.raises(ValueError, match="world size"):
        plan(FakeSpec(), 0, 10**9)
    with pytest.raises(ValueError, match="device memory"):
        parse_bytes("eighty gigs")


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 mib") == 3 * 2**19
    assert parse_bytes("4096") == 4096
