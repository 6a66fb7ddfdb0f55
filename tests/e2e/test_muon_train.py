"""`bigbatch train` with optim.name: muon on the char-level GPT config (shrunk): it trains, the loss
falls, and the LR scaling rule sets the LR both Muon and its AdamW part use."""

from __future__ import annotations

import math

import pytest

from tests.e2e.test_gpt_configs import needs_shakespeare, run_config
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@needs_shakespeare
def test_muon_trains_the_char_gpt_and_follows_the_lr_scaling_rule(tmp_path):
    overrides = ["run.max_steps=20", "optim.name=muon", "optim.lr=0.02", "optim.momentum=0.95",
                 "optim.nesterov=true", "optim.lr_scaling.rule=sqrt", "optim.lr_scaling.base_batch=64",
                 "batch.global_batch=16", "model.n_layer=2", "model.d_model=64", "lr.name=constant",
                 "lr.warmup_fraction=0", "eval.every_steps=null"]
    _, rows = run_config(REPO / "configs" / "gpt_shakespeare_char.yaml", tmp_path, *overrides)
    train = [r for r in rows if r.get("kind", "train") == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    # sqrt rule: 0.02 · √(16 / 64) = 0.01, the one LR of every param group
    assert all(r["lr"] == pytest.approx(0.02 * math.sqrt(16 / 64)) for r in train)
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-5:]) / 5
    # ln(vocabulary) ≈ 4.2 at the start; measured: 4.56 → 2.9 after 20 steps
    assert first > 4.0 and last < first - 1.0, (first, last)
