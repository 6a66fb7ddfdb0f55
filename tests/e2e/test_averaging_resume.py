"""Kill a 2-rank run that keeps a weight average, resume it, and get bitwise the same losses,
evaluations of the averaged and raw weights, and final average (the pattern of tests/e2e/test_resume.py):
under ddp (the average in replicated.pt), zero3 (its shards in step-N/dcp/) and DiLoCo (the average of
the global weights, H = 4, checkpoints every 3 steps land mid-cycle)."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch.optim.averaging import averaged_weights
from tests.e2e.test_resume import STEPS, losses, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KILL_STEP = 8  # the newest checkpoint is step 6's
CASES = {
    "ddp": ({"kind": "ema", "decay": 0.7, "every_steps": 2}, {}),
    "zero3": ({"kind": "ema", "decay": 0.7, "debias": True}, {"distributed": {"strategy": "zero3"}}),
    "diloco": ({"kind": "swa", "start_samples": 48},
               {"distributed": {"strategy": "diloco"}, "diloco": {"replicas": 2, "inner_steps": 4}}),
}


def evaluations(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r.get("kind") == "eval"]


@pytest.mark.parametrize("kind", list(CASES))
def test_killed_and_resumed_average_matches_uninterrupted(tmp_path, kind):
    ema, extra = CASES[kind]
    extra = {**extra, "ema": {"enabled": True, **ema}, "eval": {"every_steps": 2}}
    batch = {"global_batch": 16}
    reference = run(tmp_path, "reference", batch, die_at=0, extra=extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run(tmp_path, "resumed", batch, die_at=KILL_STEP, extra=extra)
    assert killed.returncode != 0
    resumed = run(tmp_path, "resumed", batch, die_at=0, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-00000006" in resumed.stdout

    runs = tmp_path / "runs"
    assert losses(runs / "resumed") == losses(runs / "reference")
    expected = evaluations(runs / "reference")
    assert [r["step"] for r in expected] == list(range(2, STEPS + 1, 2))
    assert expected[-1]["weight_average_updates"] > 0
    assert expected[-1]["val_loss"] != expected[-1]["val_loss_raw"]  # the average is what was evaluated
    assert evaluations(runs / "resumed") == expected  # bitwise: same floats
    final = f"checkpoints/step-{STEPS:08d}"
    want, got = averaged_weights(runs / "reference" / final), averaged_weights(runs / "resumed" / final)
    assert want and want.keys() == got.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())
