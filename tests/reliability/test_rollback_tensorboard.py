"""A loss-guard rollback retrains steps at x values TensorBoard already has (x = samples): TensorBoard
must show one value per x, the retrained one, while metrics.jsonl keeps every row and the rollback."""

from __future__ import annotations

import json

import pytest

from bigbatch.cli import main
from tests.conftest import tiny_config, write_config

pytestmark = pytest.mark.e2e


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag as TensorBoard shows it: (x, value) in file order, after its purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_shows_the_retrained_values_after_a_rollback(tmp_path):
    # The GlitchyMLP's 20th training forward is a spike: the guard goes back to the step-15 checkpoint
    # (15 · 16 = 240 samples) and skips 2 batches, so training goes on at 272 with step 16 at x = 288.
    model = {"name": "tests.custom_components:GlitchyMLP", "kwargs": {"d_in": 8, "classes": 3, "spike_at": 20}}
    raw = tiny_config(tmp_path, model=model, run={"max_steps": 24}, checkpoint={"every_steps": 5},
                      guard={"enabled": True, "window": 10, "spike_factor": 3.0, "skip_batches": 2},
                      metrics={"tensorboard": True, "progress": "none"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cut = [r.get("kind") for r in rows].index("guard")
    before = [r for r in rows[:cut] if r.get("kind", "train") == "train"]
    after = [r for r in rows[cut + 1:] if r.get("kind", "train") == "train"]
    # metrics.jsonl keeps the record: steps 16..19 of the abandoned trajectory, then the rollback row.
    assert [r["step"] for r in before] == list(range(1, 20)) and rows[cut]["samples"] == 272
    assert [r["samples"] for r in after] == [272 + 16 * i for i in range(1, 8)]

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for tag, points in scalars.items():
        xs = [x for x, _ in points]
        assert len(xs) == len(set(xs)), f"{tag}: an x shown twice: {xs}"
    # train/loss: the 15 steps up to the checkpoint, then only the steps trained after the rollback;
    # the abandoned steps 16..19 (x = 256..304) are gone, the retrained ones at 288 and 304 shown.
    shown = scalars["train/loss"]
    kept = before[:15] + after
    assert [x for x, _ in shown] == [r["samples"] for r in kept]
    assert [v for _, v in shown] == pytest.approx([r["loss"] for r in kept], rel=1e-6)  # float32 in TensorBoard
    assert [x for x, _ in scalars["train/lr"]] == [r["samples"] for r in kept]
    # The rollback itself stays visible, under its own prefix.
    assert scalars["guard/skipped_batches"] == [(272, 2.0)]
