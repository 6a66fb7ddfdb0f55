"""Issue 13, item 8: resuming after changing the model or optimizer. The checkpoint's resolved config
(step-N/config.yaml) is compared with the new one before anything is loaded: budget, eval, metrics,
checkpoint, slurm and distributed.timeout_s may change (logged); any other change is exit 2 listing
the keys, unless checkpoint.allow_config_change opts in (and then shapes must still match)."""

from __future__ import annotations


import pytest

from bigbatch.checkpoint.rundir import config_changes, may_change
from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch
from tests.reliability.test_run_dir import assert_one_line_exit_2, snapshot, train_steps


@pytest.fixture
def trained(tmp_path):
    raw = tiny_config(tmp_path, run={"max_steps": 10}, model={"name": "mlp", "hidden": [64, 64]},
                      checkpoint={"every_steps": 5, "keep_last": 2})
    config = write_config(tmp_path / "c.yaml", raw)
    first = bigbatch("train", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    return str(config), tmp_path / "runs" / "tiny"


@pytest.mark.parametrize("sets, listed", [
    (["model.hidden=[32]"], "model.hidden: [64, 64] → [32]"),  # before: size mismatch traceback
    (["optim.name=adam"], "optim.name: \"sgd\" → \"adam\""),  # before: KeyError: 'step'
    (["optim.lr=0.5", "run.seed=4"], "run.seed: 3 → 4; optim.lr: 0.1 → 0.5"),
])
def test_changed_model_or_optimizer_exits_2_listing_the_keys(trained, sets, listed):
    config, run_dir = trained
    before = snapshot(run_dir)
    args = [a for item in sets for a in ("--set", item)]
    result = bigbatch("train", config, *args, "--set", "run.max_steps=15")
    assert_one_line_exit_2(result, "step-00000010", listed, "checkpoint.allow_config_change: true")
    assert "run.max_steps" not in result.stderr  # a budget change is not a problem
    assert snapshot(run_dir) == before


def test_budget_eval_and_cadence_may_change_and_are_logged(trained):
    config, run_dir = trained
    result = bigbatch("train", config, "--set", "run.max_steps=15", "--set", "eval.every_steps=5",
                      "--set", "checkpoint.every_steps=3", "--set", "distributed.timeout_s=60")
    assert result.returncode == 0, result.stderr[-3000:]
    diff = next(line for line in result.stdout.splitlines() if line.startswith("config changes since"))
    for text in ("run.max_steps: 10 → 15", "eval.every_steps: null → 5", "checkpoint.every_steps: 5 → 3",
                 "distributed.timeout_s: 300.0 → 60"):
        assert text in diff
    assert "resumed from" in result.stdout and train_steps(run_dir) == list(range(1, 16))


def test_opt_in_loads_compatible_changes(trained):
    config, run_dir = trained
    result = bigbatch("train", config, "--set", "optim.lr=0.05", "--set", "run.max_steps=15",
                      "--set", "checkpoint.allow_config_change=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint.allow_config_change: loading" in result.stdout and "optim.lr: 0.1 → 0.05" in result.stdout
    assert train_steps(run_dir) == list(range(1, 16))


def test_opt_in_still_refuses_a_shape_mismatch_naming_the_parameter(trained):
    config, run_dir = trained
    before = snapshot(run_dir)
    result = bigbatch("train", config, "--set", "model.hidden=[64,32]",
                      "--set", "checkpoint.allow_config_change=true")
    assert_one_line_exit_2(result, "does not fit this model", "blocks.1.linear.weight: checkpoint [64, 64], "
                           "this config [32, 64]")
    assert snapshot(run_dir) == before


def test_opt_in_with_an_incompatible_optimizer_state_exits_2(trained):
    config, run_dir = trained
    result = bigbatch("train", config, "--set", "optim.name=adam", "--set", "checkpoint.allow_config_change=true")
    assert_one_line_exit_2(result, "cannot be loaded after changing optim.name")


def test_config_changes_flatten_and_default_keys_the_checkpoint_predates():
    saved = {"run": {"name": "a"}, "model": {"hidden": [64], "kwargs": {}}}
    current = {"run": {"name": "b", "if_exists": "resume"}, "model": {"hidden": [32], "kwargs": {"k": 1}}}
    defaults = {"run": {"name": "run", "if_exists": "resume"}, "model": {"hidden": [256], "kwargs": {}}}
    assert config_changes(saved, current, defaults) == [
        ("run.name", "a", "b"), ("model.hidden", [64], [32]), ("model.kwargs", {}, {"k": 1})]
    assert config_changes(current, saved, defaults) == [  # a removed kwarg counts too
        ("run.name", "b", "a"), ("model.hidden", [32], [64]), ("model.kwargs", {"k": 1}, {})]
    assert may_change("run.max_steps") and may_change("eval.every_steps") and may_change("slurm.time")
    assert not may_change("run.seed") and not may_change("distributed.strategy") and not may_change("evaluate")
    assert may_change("ema.eval_with_ema") and not may_change("ema.decay") and not may_change("ema.enabled")
