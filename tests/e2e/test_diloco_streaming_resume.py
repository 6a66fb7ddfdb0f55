"""Kill a 2-rank streaming DiLoCo run while a fragment's exchange is in flight, resume it, and get
bitwise the same losses (the pattern of tests/e2e/test_resume.py); also with int8 and int4
pseudo-gradients.

2 replicas, H = 4, 2 fragments, sync_delay 1: fragment 0 syncs at steps 2, 6, 10 and fragment 1 at
4, 8, 12, each exchange starting one step earlier (steps 1, 3, 5, ...), so every checkpoint (every 3
steps) is taken with an exchange in flight. Rank 1 dies at step 11: the resume starts from step 9,
whose checkpoint holds fragment 0's averaged pseudo-gradient, applied at step 10.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_resume import STEPS, losses, run

pytestmark = pytest.mark.e2e

KILL_STEP = 11
STREAMING = {"replicas": 2, "inner_steps": 4, "fragments": 2, "sync_delay": 1, "mixing": 0.5}


# DyingMLP(8, 3): tensors (16, 8), (16,), (3, 16), (3,): 128 + 16 + 48 + 3 = 195 parameters; with 2
# fragments, fragment 0 is the first weight. Bytes of one exchange, each a set of the distinct sizes:
CASES = [
    ({"method": "none"}, STREAMING, {128 * 4, (16 + 48 + 3) * 4}),
    # int8, blocks of 64: codes + 4 bytes per block; error feedback (default) keeps per-rank residuals
    ({"method": "int8"}, STREAMING, {128 + 4 * 2, (16 + 4) + (48 + 4) + (3 + 4)}),
    # int4, one scale per row, no fragments: half a byte per code (rounded up) + 4 bytes per row
    ({"method": "int4", "block_size": 0}, {"replicas": 2, "inner_steps": 4},
     {(64 + 4 * 16) + (8 + 4) + (24 + 4 * 3) + (2 + 4)}),
]


def outer_bytes(run_dir) -> set[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["comm_bytes/diloco_outer"] for r in rows if r.get("comm_bytes/diloco_outer")}


@pytest.mark.parametrize("compression, diloco, exchange_bytes", CASES)
def test_streaming_diloco_killed_mid_exchange_resumes_bitwise(tmp_path, compression, diloco, exchange_bytes):
    extra = {"distributed": {"strategy": "diloco"}, "diloco": {**diloco, "compression": compression}}
    batch = {"global_batch": 16}
    reference = run(tmp_path, "reference", batch, die_at=0, extra=extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert outer_bytes(tmp_path / "runs" / "reference") == exchange_bytes
    killed = run(tmp_path, "resumed", batch, die_at=KILL_STEP, extra=extra)
    assert killed.returncode != 0
    resumed = run(tmp_path, "resumed", batch, die_at=0, extra=extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-00000009" in resumed.stdout

    expected = losses(tmp_path / "runs" / "reference")
    assert [s for s, _, _ in expected] == list(range(1, STEPS + 1))
    assert losses(tmp_path / "runs" / "resumed") == expected
