"""Issue 13 item 5: a full disk during a checkpoint, on a real (small) tmpfs.

The run stops with exit code 1 and one line naming the file and ENOSPC; the unfinished checkpoint is
removed, older checkpoints stay valid; resuming on the still-full disk fails the same clean way (not
in the metrics truncation), and once space is back the run resumes and finishes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from bigbatch import exit_codes
from bigbatch.checkpoint.store import validate_checkpoint
from bigbatch.cli import main
from tests.conftest import tiny_config, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for this test (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a failed test may hold a file


def fill(disk: Path, leave_bytes: int) -> Path:
    """Fill the disk, then free `leave_bytes` (rounded to pages) again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    os.truncate(filler, filler.stat().st_size - leave_bytes)
    return filler


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("kind", "train") == "train"]


# Room for the metrics rows; 24 KiB also lets the 17 KB per-rank file through, so the ~44 KB
# replicated.pt (inside torch.save) is what hits the full disk; with 8 KiB the per-rank file does.
@pytest.mark.parametrize("free", [24 << 10, 8 << 10])
def test_disk_full_during_checkpoint_is_one_line_and_resumable(tmp_path, small_disk, capsys, free):
    raw = tiny_config(small_disk, run={"max_steps": 10}, model={"name": "mlp", "hidden": [64, 64]},
                      checkpoint={"every_steps": 5, "keep_last": 0})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    run_dir, checkpoints = small_disk / "runs" / "tiny", small_disk / "runs" / "tiny" / "checkpoints"
    filler = fill(small_disk, free)
    capsys.readouterr()

    for attempt in range(2):  # the second one resumes on the still-full disk
        assert main(["train", str(cfg), "--set", "run.max_steps=20"]) == exit_codes.FAILED
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"bigbatch: error: cannot write checkpoint {checkpoints / 'step-00000015'}: ")
        assert str(checkpoints / ".tmp-step-00000015") in line and "(ENOSPC)" in line
        older = ("step-00000005", "step-00000010")
        assert sorted(p.name for p in checkpoints.iterdir()) == list(older)
        assert all(validate_checkpoint(checkpoints / name) is None for name in older)

    filler.unlink()
    assert main(["train", str(cfg), "--set", "run.max_steps=20"]) == 0
    assert f"resumed from {checkpoints / 'step-00000010'}" in capsys.readouterr().out
    assert train_steps(run_dir) == list(range(1, 21))


def test_disk_full_at_start_is_one_line_and_leaves_the_files_whole(tmp_path, small_disk, capsys):
    """No space at all when a run resumes: it stops with one line naming the file and ENOSPC, and
    RUN_DIR/config.yaml and run.json keep their old content (durable writes: old or new, never half)."""
    raw = tiny_config(small_disk, run={"max_steps": 5}, checkpoint={"every_steps": 5})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    run_dir = small_disk / "runs" / "tiny"
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "run.json")}
    filler = fill(small_disk, 0)
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "run.max_steps=10"]) == exit_codes.FAILED
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bigbatch: error: cannot write ") and "(ENOSPC)" in line
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    filler.unlink()
    assert main(["train", str(cfg), "--set", "run.max_steps=10"]) == 0
    assert train_steps(run_dir) == list(range(1, 11))
