"""The loss-spike guard inside a real run: NaN steps are skipped, spikes roll back and skip data."""

from __future__ import annotations

import json

import pytest

from bigbatch.cli import main
from tests.conftest import tiny_config, write_config

pytestmark = pytest.mark.e2e


def rows(run_dir, kind="train", after_guard=False):
    all_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if after_guard:
        all_rows = all_rows[[r.get("kind") for r in all_rows].index("guard") + 1:]
    return [r for r in all_rows if r.get("kind", "train") == kind]


def test_nan_is_skipped_and_spike_rolls_back(tmp_path):
    model = {"name": "tests.custom_components:GlitchyMLP",
             "kwargs": {"d_in": 8, "classes": 3, "nan_at": 4, "spike_at": 20}}
    raw = tiny_config(tmp_path, model=model, run={"max_steps": 24}, checkpoint={"every_steps": 5},
                      guard={"enabled": True, "window": 10, "spike_factor": 3.0, "skip_batches": 2})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    train = rows(run_dir)
    nan_row = train[3]
    assert nan_row["step"] == 4 and nan_row.get("skipped") and nan_row["grad_norm"] != nan_row["grad_norm"]
    [rollback] = rows(run_dir, "guard")
    # The spike came at the 20th forward = step 20; the newest checkpoint was step 15. Training goes
    # on from step 15 after skipping 2 batches of 16 samples: samples 15·16 + 2·16 = 272.
    assert rollback["step"] == 15 and rollback["skipped_batches"] == 2 and rollback["samples"] == 272
    # The run ends on its sample budget, 24 steps × 16 = 384 samples: 7 more steps after 272.
    after = rows(run_dir, after_guard=True)
    assert [r["step"] for r in after] == list(range(16, 23))
    assert [r["samples"] for r in after] == [272 + 16 * i for i in range(1, 8)]
    assert all(r["loss"] < 10 for r in after)  # the spike did not come back
