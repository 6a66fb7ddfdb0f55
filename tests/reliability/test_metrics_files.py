"""Issue 13 item 3: torn metrics lines, metrics on disk before a checkpoint, no TensorBoard duplicates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bigbatch import exit_codes
from bigbatch.cli import main
from tests.conftest import tiny_config, write_config

pytestmark = pytest.mark.e2e


def config(tmp_path: Path, steps: int = 10, **sections) -> Path:
    raw = tiny_config(tmp_path, run={"max_steps": steps}, model={"name": "mlp", "hidden": [64, 64]},
                      checkpoint={"every_steps": 5, "keep_last": 0}, **sections)
    return write_config(tmp_path / "c.yaml", raw)


def metrics_file(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "tiny" / "metrics.jsonl"


def train_steps(path: Path) -> list[int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in rows if r.get("kind", "train") == "train"]


def test_torn_last_line_is_dropped_on_resume_with_a_warning_naming_the_file(tmp_path, capsys):
    cfg = config(tmp_path, steps=7)
    assert main(["train", str(cfg)]) == 0
    path = metrics_file(tmp_path)
    with open(path, "a") as f:  # what a kill or a full disk leaves mid-write
        f.write('{"step": 8, "samples": 128, "loss": 1.0')
    assert main(["train", str(cfg), "--set", "run.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: dropping its torn last line" in out
    assert train_steps(path) == list(range(1, 11))  # every line parses, no step twice


def test_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path, capsys):
    cfg = config(tmp_path, steps=7)
    assert main(["train", str(cfg)]) == 0
    path = metrics_file(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "run.max_steps=10"]) == exit_codes.BAD_INPUT
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"{path}: line 3 is not a metrics row" in line
    assert path.read_bytes() == before  # nothing already written is lost


def test_metrics_are_fsynced_before_each_checkpoint(tmp_path, monkeypatch):
    """Every checkpoint's first fsync comes after an fsync of metrics.jsonl that held its step's row."""
    events, real_fsync = [], os.fsync

    def recording_fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("metrics.jsonl"):
            events.append(("metrics", train_steps(Path(name))[-1]))
        elif ".tmp-step-" in name and name.endswith(".pt"):
            events.append(("checkpoint", int(name.split(".tmp-step-")[1][:8])))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert main(["train", str(config(tmp_path))]) == 0
    for step in (5, 10):
        first = events.index(("checkpoint", step))
        assert ("metrics", step) in events[:first], events


def tensorboard_points(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def test_tensorboard_has_no_duplicate_points_after_resuming_from_an_earlier_checkpoint(tmp_path):
    cfg = config(tmp_path, steps=12, metrics={"tensorboard": True, "progress": "none"})
    assert main(["train", str(cfg)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert tensorboard_points(run_dir, "train/loss") == [16 * s for s in range(1, 13)]
    earlier = run_dir / "checkpoints" / "step-00000005"
    assert main(["train", str(cfg), "--set", f"checkpoint.resume={earlier}"]) == 0
    # x = samples: steps 6..12 were trained twice, and TensorBoard shows each once.
    assert tensorboard_points(run_dir, "train/loss") == [16 * s for s in range(1, 13)]
    assert train_steps(run_dir / "metrics.jsonl") == list(range(1, 13))
