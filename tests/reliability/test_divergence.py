"""Issue 13 item 2: a diverging run is caught, stops with exit code 3, and keeps a finite checkpoint.

Non-finite losses and gradient norms are skipped with the guard off (its default), weights untouched;
after guard.max_consecutive_skips skips in a row the run stops with exit code 3 and a "diverged"
summary; meta.json records `finite`, pruning keeps the newest finite checkpoint and `resume: auto`
prefers it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bigbatch import exit_codes
from bigbatch.cli import main
from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

pytestmark = pytest.mark.e2e


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite gradient norm."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class BadFromMLP(nn.Module):
    """An MLP that goes bad from its `bad_from`-th training forward on (on global rank `rank` only,
    when given): `corrupt` overwrites a weight with NaN once (silent state corruption), `inf_grad`
    makes every backward infinite."""

    def __init__(self, d_in: int, classes: int, bad_from: int, mode: str, rank: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, classes))
        self.bad_from, self.mode, self.calls = bad_from, mode, 0
        if rank is not None and int(os.environ.get("RANK", 0)) != rank:
            self.mode = "good"

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.bad_from and self.mode == "corrupt":
                with torch.no_grad():
                    self.net[1].weight[0, 0] = float("nan")
        out = self.net(x)
        if self.training and self.calls >= self.bad_from and self.mode == "inf_grad":
            out = _InfGrad.apply(out)
        return out


def config(tmp_path: Path, model: dict | None = None, **sections) -> Path:
    defaults = {"run": {"max_steps": 20}, "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                "checkpoint": {"every_steps": 5, "keep_last": 2}}
    raw = tiny_config(tmp_path, model=model or {"name": "mlp", "hidden": [64, 64]},
                      **{key: {**defaults.get(key, {}), **sections.get(key, {})}
                         for key in {*defaults, *sections}})
    return write_config(tmp_path / "c.yaml", raw)


def bad_model(bad_from: int, mode: str, **kwargs) -> dict:
    return {"name": "tests.reliability.test_divergence:BadFromMLP",
            "kwargs": {"d_in": 8, "classes": 3, "bad_from": bad_from, "mode": mode, **kwargs}}


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == "train"]


def meta(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "meta.json").read_text())


def replicated(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "replicated.pt", weights_only=True)


def test_huge_lr_skips_non_finite_steps_then_exits_3_saying_diverged(tmp_path, capsys):
    cfg = config(tmp_path, optim={"lr": 1e6}, checkpoint={"every_steps": 1, "keep_last": 0},
                 guard={"max_consecutive_skips": 4})
    assert main(["train", str(cfg)]) == exit_codes.DIVERGED
    out = capsys.readouterr().out
    [summary] = [line for line in out.splitlines() if line.startswith("diverged:")]
    assert "4 steps in a row" in summary and "guard.max_consecutive_skips: 4" in summary
    run_dir = tmp_path / "runs" / "tiny"
    rows = train_rows(run_dir)
    first_bad = next(r["step"] for r in rows if r.get("skipped"))
    assert [r["step"] for r in rows] == list(range(1, first_bad + 4))  # 4 skips, then it stopped
    assert all(r.get("skipped") for r in rows[first_bad - 1:])
    # The skipped steps left model and optimizer (momentum) bitwise as the last applied step made them.
    applied = replicated(run_dir, first_bad - 1)
    for step in range(first_bad, first_bad + 3):
        state = replicated(run_dir, step)
        assert meta(run_dir, step)["finite"] is True
        for key in ("model", "optimizer"):
            torch.testing.assert_close(state[key], applied[key], rtol=0, atol=0)
    assert not (run_dir / "checkpoints" / f"step-{first_bad + 3:08d}").exists()  # none once diverged


def test_infinite_gradient_norm_with_finite_loss_is_skipped(tmp_path, capsys):
    cfg = config(tmp_path, model=bad_model(bad_from=7, mode="inf_grad"), guard={"max_consecutive_skips": 3})
    assert main(["train", str(cfg)]) == exit_codes.DIVERGED
    run_dir = tmp_path / "runs" / "tiny"
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert [bool(r.get("skipped")) for r in rows] == [False] * 6 + [True] * 3
    assert all(r["loss"] < 10 for r in rows) and not math.isfinite(rows[-1]["grad_norm"])
    assert "diverged: stopped at step 9" in capsys.readouterr().out


def test_non_finite_checkpoints_never_displace_the_newest_finite_one(tmp_path, capsys):
    # A NaN written into a weight at step 7: checkpoints 10 and 15 hold NaN, 5 is the last finite.
    cfg = config(tmp_path, model=bad_model(bad_from=7, mode="corrupt"), guard={"max_consecutive_skips": 12})
    assert main(["train", str(cfg)]) == exit_codes.DIVERGED
    run_dir = tmp_path / "runs" / "tiny"
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-00000005", "step-00000010", "step-00000015"]  # keep_last 2 + newest finite
    assert [meta(run_dir, s)["finite"] for s in (5, 10, 15)] == [True, False, False]
    assert "newest finite checkpoint" in capsys.readouterr().out

    # resume: auto goes back to step 5 and says why it passed over 15 and 10.
    assert main(["train", str(cfg), "--set", "run.max_steps=30"]) == exit_codes.DIVERGED
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-00000005 (step 5" in out
    for step in (15, 10):
        assert f"skipping checkpoint {run_dir / 'checkpoints' / f'step-{step:08d}'}: " in out
    assert out.count("not finite (meta.json finite: false)") == 2
    # Resumed at 5, corrupted at its 7th forward (step 12): its step 10 is now the newest finite one.
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-00000010", "step-00000015", "step-00000020"]
    assert [meta(run_dir, s)["finite"] for s in (10, 15, 20)] == [True, False, False]


def test_nan_error_stops_at_the_first_non_finite_step_with_exit_3(tmp_path, capsys):
    cfg = config(tmp_path, model=bad_model(bad_from=3, mode="corrupt"), guard={"nan": "error"})
    assert main(["train", str(cfg)]) == exit_codes.DIVERGED
    assert "diverged: stopped at step 2: non-finite loss nan at step 3" in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["ddp", "diloco"])
def test_ranks_agree_on_divergence(tmp_path, strategy):
    """Only rank 1's gradients are infinite: under DDP the all-reduced norm is infinite everywhere;
    DiLoCo replicas keep their own gradients, so the ranks agree on the verdict (else rank 0 would
    train on and wait for rank 1 at the next collective)."""
    extra = {"distributed": {"strategy": "diloco", "timeout_s": 60},
             "diloco": {"replicas": 2, "inner_steps": 4}} if strategy == "diloco" else {}
    cfg = config(tmp_path, model=bad_model(bad_from=3, mode="inf_grad", rank=1),
                 guard={"max_consecutive_skips": 3}, **extra)
    result = bigbatch("launch", "--nproc-per-node", "2", str(cfg))
    assert result.returncode == exit_codes.DIVERGED, result.stderr[-3000:]
    [summary] = [line for line in result.stdout.splitlines() if line.startswith("diverged:")]
    assert "stopped at step 5: 3 steps in a row" in summary
    assert [r["step"] for r in train_rows(tmp_path / "runs" / "tiny")] == [1, 2, 3, 4, 5]
