"""Kill a 2-rank DiLoCo run with a synchronous warm-up (`diloco.warmup_steps`) during or right after
the warm-up, resume it, and get bitwise the same losses (the pattern of tests/e2e/test_resume.py).

Checkpoints every 3 steps, 12 steps. Plain: H = 3, W = 6; rank 1 dies at step 5 (resume from step 3,
mid-warm-up) or 8 (from step 6, the warm-up's last step). Streaming: H = 4, W = 8, 2 fragments, tau 1;
dies at 5 (from 3, mid-warm-up) or 11 (from 9, which started fragment 0's first exchange: in flight).
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_resume import STEPS, losses, run

pytestmark = pytest.mark.e2e

PARAMS = 195  # DyingMLP(8, 3): 128 + 16 + 48 + 3
PLAIN = {"replicas": 2, "inner_steps": 3, "warmup_steps": 6}
STREAMING = {"replicas": 2, "inner_steps": 4, "warmup_steps": 8, "fragments": 2, "sync_delay": 1, "mixing": 0.5}
CASES = [(PLAIN, 5, 3), (PLAIN, 8, 6), (STREAMING, 5, 3), (STREAMING, 11, 9)]


def warmup_bytes(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["comm_bytes/diloco_warmup"] for r in rows if r.get("kind", "train") == "train"]


@pytest.mark.parametrize("diloco, kill_step, resumed_from", CASES)
def test_diloco_warmup_killed_and_resumed_matches_uninterrupted(tmp_path, diloco, kill_step, resumed_from):
    extra = {"distributed": {"strategy": "diloco"}, "diloco": diloco}
    batch = {"global_batch": 16}
    reference = run(tmp_path, "reference", batch, die_at=0, extra=extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    warmup = diloco["warmup_steps"]
    assert warmup_bytes(tmp_path / "runs" / "reference") == [PARAMS * 4] * warmup + [0] * (STEPS - warmup)
    killed = run(tmp_path, "resumed", batch, die_at=kill_step, extra=extra)
    assert killed.returncode != 0
    resumed = run(tmp_path, "resumed", batch, die_at=0, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"step-{resumed_from:08d}" in resumed.stdout

    expected = losses(tmp_path / "runs" / "reference")
    assert [s for s, _, _ in expected] == list(range(1, STEPS + 1))
    assert losses(tmp_path / "runs" / "resumed") == expected  # bitwise: same floats, no duplicate step
