"""Issue 13 item 10 (checkpoint half): crafted meta.json and pickle payloads are invalid checkpoints,
skipped with a reason for the previous one, never a MemoryError or a raw UnpicklingError."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bigbatch import exit_codes
from bigbatch.checkpoint.stateful import Counters, RNGState
from bigbatch.checkpoint.store import find_latest_valid, save_checkpoint, validate_checkpoint
from bigbatch.cli import main
from tests.conftest import REPO, tiny_config, write_config

MARKER = "BIGBATCH_HOSTILE_MARKER"


def save(root: Path, step: int) -> Path:
    return save_checkpoint(root, step, step * 16, {"counters": Counters(step=step, samples=step * 16)},
                           {"rng": RNGState()}, rank=0, world_size=1)


def edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("world_size, reason", [
    (-3, "world_size -3, not between 1 and the 2 files"),
    (0, "world_size 0, not between 1"),
    (7, "world_size 7, not between 1 and the 2 files"),
    (1e9, "no valid 'world_size'"),
    ("2", "no valid 'world_size'"),
    (True, "no valid 'world_size'"),
])
def test_crafted_world_size_is_invalid_with_a_reason(tmp_path, world_size, reason):
    edit_meta(save(tmp_path, 3), world_size=world_size)
    assert reason in validate_checkpoint(tmp_path / "step-00000003")


def test_a_billion_ranks_in_meta_json_is_skipped_not_a_memory_error(tmp_path):
    """In a child process limited to 2 GiB, so the old behaviour fails fast instead of eating the machine."""
    save(tmp_path, 3)
    edit_meta(save(tmp_path, 6), world_size=10**9)
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from bigbatch.checkpoint.store import find_latest_valid
        print(find_latest_valid({str(tmp_path)!r}, log=print))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    reason = "meta.json has world_size 1000000000, not between 1 and the 2 files it lists"
    assert f"skipping checkpoint {tmp_path / 'step-00000006'}: {reason}" in result.stdout
    assert result.stdout.strip().endswith(str(tmp_path / "step-00000003"))


class Payload:
    """Unpickling this runs os.system: what torch.load(weights_only=True) must refuse."""

    def __reduce__(self):
        return os.system, (f"touch {os.environ[MARKER]}",)


def plant_pickle(step_dir: Path, marker: Path) -> None:
    """Replace replicated.pt by a pickle payload and fix meta.json's size and sha256 to match it."""
    os.environ[MARKER] = str(marker)
    torch.save({"counters": Payload()}, step_dir / "replicated.pt")
    data = (step_dir / "replicated.pt").read_bytes()
    meta = json.loads((step_dir / "meta.json").read_text())
    meta["files"]["replicated.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "meta.json").write_text(json.dumps(meta))


def test_pickle_payload_is_invalid_and_resume_takes_the_previous_checkpoint(tmp_path, capsys):
    raw = tiny_config(tmp_path, run={"max_steps": 10}, model={"name": "mlp", "hidden": [64, 64]},
                      checkpoint={"every_steps": 5})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    marker = tmp_path / "payload-ran"
    plant_pickle(checkpoints / "step-00000010", marker)
    assert validate_checkpoint(checkpoints / "step-00000010") is None  # checksums match: it looks valid
    capsys.readouterr()

    assert main(["train", str(cfg), "--set", "run.max_steps=12"]) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint {checkpoints / 'step-00000010'}: invalid (" in out
    assert "weights_only" in out and "trying the previous one" in out
    assert f"resumed from {checkpoints / 'step-00000005'} (step 5" in out
    assert not marker.exists()  # the payload never ran


def test_pickle_payload_as_explicit_resume_path_exits_2_with_one_line(tmp_path, capsys):
    save(tmp_path / "ckpt", 3)
    marker = tmp_path / "payload-ran"
    plant_pickle(tmp_path / "ckpt" / "step-00000003", marker)
    raw = tiny_config(tmp_path, run={"max_steps": 5},
                      checkpoint={"resume": str(tmp_path / "ckpt" / "step-00000003")})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == exit_codes.BAD_INPUT
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "step-00000003/replicated.pt: torch.load(weights_only=True) refused it" in line
    assert not marker.exists()
    assert find_latest_valid(tmp_path / "ckpt", log=lambda _: None) is not None  # nothing deleted
