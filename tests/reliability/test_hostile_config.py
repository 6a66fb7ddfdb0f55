"""Issue 13, items 6 and 7: hostile numbers and YAML in a config stop at once with exit 2 naming the key.

An alias bomb used to hang `--print-config` and `train` expanding 9^9 values; huge counts hung an
O(max_steps) loop, overflowed or ran out of memory; inf/nan passed the schema.
"""

from __future__ import annotations

import pytest
import yaml

from bigbatch.training.build import samples_after_steps, total_samples
from bigbatch.cli import main
from bigbatch.config import MAX_COUNT, ConfigError
from bigbatch.optim.batch_schedule import BatchSchedule, batch_schedule_from
from bigbatch.validate import load_config
from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch

HANG = 30  # seconds: a hang is the failure; validation answers in well under one


def alias_bomb(indent: str, item: str = "") -> str:
    """Nine levels of nine aliases: 1 kB of YAML, 9**9 values once expanded."""
    lines = [f"{indent}{item}l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{indent}{item}l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


def bomb_config(tmp_path, where: str):
    """tiny_config with the bomb under model.kwargs, or as run.name (a list of the nine levels)."""
    raw = tiny_config(tmp_path)
    if where == "model.kwargs":
        del raw["model"]
        section = "model:\n  name: mlp\n  hidden: [16]\n  kwargs:\n" + alias_bomb("    ")
    else:
        run = raw.pop("run")
        del run["name"]
        section = yaml.safe_dump({"run": run}) + "  name:\n" + alias_bomb("  ", "- ")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw) + section)
    return config


@pytest.mark.parametrize("command", [["--print-config"], []], ids=["print-config", "train"])
@pytest.mark.parametrize("where", ["model.kwargs", "run.name"])
def test_alias_bomb_exits_2_at_once_naming_the_file(tmp_path, where, command):
    config = bomb_config(tmp_path, where)
    result = bigbatch("train", str(config), *command, timeout=HANG)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"config file {config}: line " in result.stderr
    assert "anchors and aliases" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_alias_in_an_override_is_refused(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    assert main(["train", str(config), "--print-config", "--set", "model.kwargs={a: &a [1], b: *a}"]) == 2
    assert "anchors and aliases (&name, *name, <<: *name) are not allowed" in capsys.readouterr().err


def test_deep_nesting_is_a_config_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  kwargs:\n    deep: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["train", str(config), "--print-config"]) == 2
    assert f"config file {config}: nested too deeply" in capsys.readouterr().err


@pytest.mark.parametrize("override, key, says", [
    ("run.seed=100000000000000000000000000000", "run.seed", "less than or equal to 4294967295"),
    ("run.seed=-1", "run.seed", "greater than or equal to 0"),
    ("run.epochs=.inf", "run.epochs", "finite number"),
    ("run.epochs=.nan", "run.epochs", "finite number"),
    ("run.max_steps=1000000000000000000", "run.max_steps", f"less than or equal to {MAX_COUNT}"),
    ("batch.global_batch=100000000000000000000", "batch.global_batch", f"less than or equal to {MAX_COUNT}"),
    ("optim.lr=.inf", "optim.lr", "finite number"),
    ("optim.betas=[0.9, 1.5]", "optim.betas.1", "less than 1"),
    ("distributed.timeout_s=.nan", "distributed.timeout_s", "finite number"),
    ("model.hidden=[16, -1]", "model.hidden.1", "greater than 0"),
])
def test_out_of_range_numbers_name_the_key(tmp_path, capsys, override, key, says):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    assert main(["train", str(config), "--print-config", "--set", override]) == 2
    err = capsys.readouterr().err
    assert f"  - {key}: " in err and says in err and "Traceback" not in err


def test_huge_max_steps_with_an_epoch_limit_trains_one_epoch(tmp_path):
    raw = tiny_config(tmp_path, run={"max_steps": 10**12, "epochs": 1})
    config = write_config(tmp_path / "c.yaml", raw)
    result = bigbatch("train", str(config), timeout=120)  # used to loop 10**12 times before step 1
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done: 12 steps, 192 samples" in result.stdout  # 192 training samples / 16 per step


def test_a_ramp_of_too_many_increments_is_refused_before_listing_them(tmp_path):
    raw = tiny_config(tmp_path, batch={"global_batch": 2**40,
                                       "schedule": {"kind": "ramp", "start": 1, "increment": 1,
                                                    "ramp_samples": 2**50}})
    config = write_config(tmp_path / "c.yaml", raw)
    result = bigbatch("train", str(config), "--print-config", timeout=HANG)
    assert result.returncode == 2
    assert "batch.schedule.increment: 1099511627775 increments from 1 to 1099511627776" in result.stderr


def test_a_global_batch_larger_than_the_training_set_is_bad_input(tmp_path, capsys):
    raw = tiny_config(tmp_path, batch={"global_batch": 10**15})
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(config)]) == 2  # used to gather 10**15 indices, out of memory
    err = capsys.readouterr().err
    assert "batch.global_batch: a global batch of 1000000000000000 is larger than the training set " \
           "(192 samples of data.name=synthetic); use at most 192" in err
    assert not (tmp_path / "runs").exists()


def test_synthetic_data_too_large_to_draw_is_refused_before_drawing(tmp_path, capsys):
    raw = tiny_config(tmp_path, data={"num_samples": 10**12})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw)), "--print-config"]) == 2
    assert "  - data.num_samples: 1000000000000 synthetic samples of shape [8] (and the teacher for 3 " \
           "classes) are 8000000000024 values, more than 1073741824 (4 GiB)" in capsys.readouterr().err


def loop_total(schedule: BatchSchedule, steps: int) -> int:
    """What build.total_samples computed before: one batch_at call per step."""
    samples = 0
    for _ in range(steps):
        samples += schedule.batch_at(samples)
    return samples


SCHEDULES = [
    BatchSchedule("constant", target=7),
    BatchSchedule("ramp", target=40, start=4, increment=4, ramp_samples=100),
    BatchSchedule("ramp", target=40, start=4, increment=4, ramp_samples=7),   # steps overshoot edges
    BatchSchedule("ramp", target=13, start=1, increment=3, ramp_samples=2),   # several edges per sample
    BatchSchedule("ramp", target=9, start=9, increment=1, ramp_samples=50),   # no increment at all
    BatchSchedule("stages", target=16, stages=((10, 3), (11, 5), (60, 5), (61, 2))),
    BatchSchedule("stages", target=4, stages=((1, 100), (500, 8))),           # a step jumps a stage
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=[f"{s.kind}{i}" for i, s in enumerate(SCHEDULES)])
def test_closed_form_run_length_equals_the_step_loop(schedule):
    for steps in range(1, 80):
        assert samples_after_steps(schedule.change_points(), steps) == loop_total(schedule, steps), steps


def test_total_samples_takes_the_smallest_limit_without_a_step_loop(tmp_path):
    raw = tiny_config(tmp_path, run={"max_steps": MAX_COUNT, "max_samples": None, "epochs": 2.5},
                      batch={"global_batch": 16, "schedule": {"kind": "ramp", "start": 4, "increment": 4,
                                                              "ramp_samples": 96}})
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    assert total_samples(cfg, 192, batch_schedule_from(cfg.batch)) == 480  # 2.5 epochs of 192
    cfg.run.epochs = None
    # 8 steps of 4 to 32 samples, 4 of 8 to 64, 3 of 12 to 100, the rest at 16
    assert total_samples(cfg, 192, batch_schedule_from(cfg.batch)) == 100 + 16 * (MAX_COUNT - 15)


def test_every_float_key_rejects_inf_and_nan_in_the_schema(tmp_path):
    raw = tiny_config(tmp_path, optim={"lr": float("nan"), "weight_decay": float("inf")},
                      data={"val_fraction": float("nan")}, lr={"min_lr_ratio": float("nan")})
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.yaml", raw))
    keys = sorted(p.split(":")[0] for p in info.value.problems)
    assert keys == ["data.val_fraction", "lr.min_lr_ratio", "optim.lr", "optim.weight_decay"]
