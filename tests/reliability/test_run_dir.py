"""Issue 13, items 1 and 10: a run directory belongs to one run.

A used run dir is never mixed with a new run (`checkpoint.resume: never` is refused, `run.if_exists`
says what to do instead), pruning deletes only this run's checkpoints, and `run.name` cannot leave
`run.out_dir`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.checkpoint.rundir import RUN_FILE, run_name_problems
from bigbatch.checkpoint.store import prune_checkpoints
from bigbatch.config import RunConfig
from tests.conftest import REPO, tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch
from tests.unit.test_checkpoint_store import save_states

STEPS, EVERY = 20, 5


def config(tmp_path: Path, **run) -> Path:
    raw = tiny_config(tmp_path, run={"max_steps": STEPS, **run}, model={"name": "mlp", "hidden": [64, 64]},
                      checkpoint={"every_steps": EVERY, "keep_last": 2})
    return write_config(tmp_path / "c.yaml", raw)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder but the lock file (whose holder line each start rewrites)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r.get("kind", "train") == "train"]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def assert_one_line_exit_2(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def used_run(tmp_path):
    cfg = config(tmp_path)
    first = bigbatch("train", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert checkpoints(run_dir) == ["step-00000015", "step-00000020"]
    return cfg, run_dir


def test_resume_never_on_a_used_dir_exits_2_and_changes_nothing(used_run):
    cfg, run_dir = used_run
    before = snapshot(run_dir)
    result = bigbatch("train", str(cfg), "--set", "checkpoint.resume=never")
    assert_one_line_exit_2(result, "checkpoint.resume: never", str(run_dir), "run.if_exists: archive")
    assert snapshot(run_dir) == before  # before: step-15/20 replaced, metrics steps 1-20 twice


def test_if_exists_error_refuses_a_used_dir(used_run):
    cfg, run_dir = used_run
    before = snapshot(run_dir)
    result = bigbatch("train", str(cfg), "--set", "run.if_exists=error")
    assert_one_line_exit_2(result, "run.if_exists: error", str(run_dir))
    assert snapshot(run_dir) == before


def test_if_exists_archive_moves_the_old_run_aside_and_starts_fresh(used_run):
    cfg, run_dir = used_run
    before = snapshot(run_dir)
    old_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    result = bigbatch("train", str(cfg), "--set", "run.if_exists=archive", "--set", "checkpoint.resume=never")
    assert result.returncode == 0, result.stderr[-3000:]
    archived = sorted(run_dir.parent.glob("tiny.archived-*"))
    assert len(archived) == 1 and archived[0].name[len("tiny.archived-"):].replace("-", "").isdigit()
    assert snapshot(archived[0]) == before  # the old run, byte for byte
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert checkpoints(run_dir) == ["step-00000015", "step-00000020"]
    new_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    assert new_id != old_id
    meta = json.loads((run_dir / "checkpoints" / "step-00000020" / "meta.json").read_text())
    assert meta["run_id"] == new_id


def test_auto_resume_keeps_the_run_id_and_has_no_duplicate_steps(used_run):
    cfg, run_dir = used_run
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    result = bigbatch("train", str(cfg), "--set", f"run.max_steps={STEPS + 10}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "run.max_steps: 20 → 30" in result.stdout
    assert json.loads((run_dir / RUN_FILE).read_text())["run_id"] == run_id
    assert train_steps(run_dir) == list(range(1, STEPS + 11))
    assert checkpoints(run_dir) == ["step-00000025", "step-00000030"]


def test_a_restart_before_the_first_checkpoint_drops_its_own_rows(tmp_path):
    model = {"name": "tests.custom_components:DyingMLP", "kwargs": {"d_in": 8, "classes": 3, "die_at": 3}}
    # rows reach the disk every log_every_steps steps (the loss is read then): with 2, steps 1 and 2
    # are on disk when step 3 dies
    raw = tiny_config(tmp_path, run={"max_steps": 6}, model=model, checkpoint={"every_steps": 5},
                      metrics={"log_every_steps": 2})
    killed = bigbatch("train", str(write_config(tmp_path / "c.yaml", raw)))
    assert killed.returncode != 0
    run_dir = tmp_path / "runs" / "tiny"
    assert train_steps(run_dir) == [1, 2] and not (run_dir / "checkpoints").exists()
    model["kwargs"]["die_at"] = 0
    result = bigbatch("train", str(write_config(tmp_path / "c.yaml", raw)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_steps(run_dir) == list(range(1, 7))  # before: 1, 2, 1, 2, 3, 4, 5, 6


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (15, 20):  # an earlier run's newer steps outrank ours by step number
        save_states(root, step, meta_extra={"run_id": "old"})
    for step in (1, 5, 10):
        save_states(root, step, meta_extra={"run_id": "new"})
    removed = prune_checkpoints(root, keep_last=2, run_id="new")
    assert [p.name for p in removed] == ["step-00000001"]
    assert sorted(p.name for p in root.iterdir()) == [
        "step-00000005", "step-00000010", "step-00000015", "step-00000020"]


@pytest.mark.parametrize("name", ["../escape", "/abs/run", "a/b", "..", ".", "", "a\\b", " x"])
def test_run_name_must_be_a_plain_name(name):
    problems = run_name_problems(RunConfig(name=name))
    assert len(problems) == 1 and problems[0].startswith("run.name:")


@pytest.mark.parametrize("name", ["tiny", "exp-1.v2", "a..b", "run_ü"])
def test_plain_run_names_pass(name):
    assert run_name_problems(RunConfig(name=name)) == []


@pytest.mark.parametrize("name", ["../escape", "ABS"])
def test_run_name_outside_out_dir_exits_2_writing_nothing(tmp_path, name):
    name = str(tmp_path / "escape") if name == "ABS" else name
    cfg = config(tmp_path, name=name)
    result = bigbatch("train", str(cfg))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "run.name" in result.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


def test_archive_spares_a_requeue_of_the_same_slurm_job(tmp_path, monkeypatch):
    from bigbatch.checkpoint.rundir import claim_run_dir

    run_dir = tmp_path / "runs" / "tiny"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    first = claim_run_dir(run_dir, "archive", "auto", print)
    first.started("hash")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    first.lock.release()
    requeued = claim_run_dir(run_dir, "archive", "auto", print)  # Slurm requeued the same job
    assert requeued.run_id == first.run_id and not list(run_dir.parent.glob("tiny.archived-*"))
    requeued.lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # a new job with the same run.name
    fresh = claim_run_dir(run_dir, "archive", "auto", print)
    probe = subprocess.run(  # the fresh directory is locked, not only the archived one
        [sys.executable, "-c", "import sys; from bigbatch.checkpoint.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]).acquire(print)", str(run_dir)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert probe.returncode != 0 and "in use by another run" in probe.stderr
    fresh.lock.release()
    archived = list(run_dir.parent.glob("tiny.archived-*"))
    assert fresh.run_id != first.run_id and len(archived) == 1
    assert (archived[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_metrics_of_an_unknown_earlier_run_are_not_dropped(tmp_path):
    # A run dir from before run ids (no run.json) with rows but no checkpoint: nothing to resume, and
    # starting over would drop or duplicate someone's rows.
    cfg = config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    result = bigbatch("train", str(cfg))
    assert_one_line_exit_2(result, "no run.json", "run.if_exists: archive")
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "metrics.jsonl"]
