"""Config loading: every bad input is reported with its key, all at once, with exit code 2."""

from __future__ import annotations

import pytest

from bigbatch.cli import main
from bigbatch.config import ConfigError, split_batch
from bigbatch.validate import load_config, world_problems
from tests.conftest import REPO, tiny_config, write_config


def problems_of(tmp_path, raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.yaml", raw), list(overrides))
    return info.value.problems


def test_unknown_key_lists_valid_keys_and_closest_match(tmp_path):
    raw = tiny_config(tmp_path, optim={"learning_rate": 0.1})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("optim.learning_rate: unknown key")
    assert "Valid keys here: name, lr," in problem


def test_unknown_key_suggests_close_spelling(tmp_path):
    raw = tiny_config(tmp_path, batch={"global_bach": 32})
    [problem] = problems_of(tmp_path, raw)
    assert "Did you mean 'global_batch'?" in problem


def test_wrong_type_names_the_key(tmp_path):
    [problem] = problems_of(tmp_path, tiny_config(tmp_path, batch={"global_batch": "many"}))
    assert problem.startswith("batch.global_batch:") and "'many'" in problem


def test_several_errors_are_reported_together(tmp_path):
    raw = tiny_config(tmp_path, optim={"lr": -1, "nme": "sgd"}, run={"seed": "x"})
    keys = sorted(p.split(":")[0] for p in problems_of(tmp_path, raw))
    assert keys == ["optim.lr", "optim.nme", "run.seed"]


def test_missing_fashion_mnist_path_says_how_to_install(tmp_path):
    raw = tiny_config(tmp_path, data={"name": "fashion_mnist", "path": str(tmp_path / "nowhere")})
    [problem] = problems_of(tmp_path, raw)
    assert problem.startswith("data.path:") and "apt-get install dataset-fashion-mnist" in problem


def test_bad_import_path_names_the_key(tmp_path):
    [problem] = problems_of(tmp_path, tiny_config(tmp_path, model={"name": "no_such_pkg.mod:Net"}))
    assert problem.startswith("model.name: cannot import 'no_such_pkg.mod:Net'")


def test_override_sets_nested_value_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path))
    cfg = load_config(path, ["optim.lr=0.25", "model.hidden=[4, 5]", "optim.nesterov=true"])
    assert (cfg.optim.lr, cfg.model.hidden, cfg.optim.nesterov) == (0.25, [4, 5], True)


def test_bad_override_syntax_is_reported(tmp_path):
    problems = problems_of(tmp_path, tiny_config(tmp_path), ["optim.lr", "a..b=1"])
    assert len(problems) == 2 and all(p.startswith("--set") for p in problems)


def test_cli_exits_2_and_writes_nothing(tmp_path, capsys):
    raw = tiny_config(tmp_path, optim={"lr": "fast"})
    code = main(["train", str(write_config(tmp_path / "c.yaml", raw))])
    assert code == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_bad_override_exits_2(tmp_path, capsys):
    code = main(["train", str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path))), "--set", "oops"])
    assert code == 2 and "--set 'oops'" in capsys.readouterr().err


def test_print_config_shows_resolved_defaults(tmp_path, capsys):
    assert main(["train", str(write_config(tmp_path / "c.yaml", tiny_config(tmp_path))),
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "global_batch: 16" in out and "precision: fp32" in out  # given and default values


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_split_batch_derives_micro_batch_and_accumulation():
    assert split_batch(256, 2, None) == (128, 1)   # no micro cap: one micro-batch per rank
    assert split_batch(256, 2, 32) == (32, 4)      # 128 per rank in 4 micro-batches of 32
    assert split_batch(256, 4, 128) == (64, 1)     # per-rank batch already below the cap


def test_split_batch_errors_show_the_arithmetic():
    with pytest.raises(ValueError, match=r"1000 / 3 = 333.333"):
        split_batch(1000, 3, None)
    with pytest.raises(ValueError, match=r"per-rank batch 100 .* 100 / 30 = 3.33333"):
        split_batch(200, 2, 30)


def test_every_scheduled_batch_is_checked_against_the_world(tmp_path):
    raw = tiny_config(tmp_path, batch={"global_batch": 64, "schedule": {
        "kind": "ramp", "start": 16, "increment": 16, "ramp_samples": 480}})
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    assert world_problems(cfg, 4) == []
    # The ramp visits 16, 32, 48, 64: over 32 ranks, 16 and 48 cannot be split.
    problems = world_problems(cfg, 32)
    assert [p.split(" does")[0] for p in problems] == ["batch.global_batch=16", "batch.global_batch=48"]


def test_print_config_comments_every_key_and_loads_back(tmp_path, capsys):
    import yaml

    raw = tiny_config(tmp_path, run={"name": "it's: # tricky"}, data={"glob": "*.txt"})
    config = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(config), "--print-config"]) == 0
    text = capsys.readouterr().out
    cfg = load_config(config)
    assert yaml.safe_load(text) == yaml.safe_load(cfg.to_yaml())  # comments change nothing
    assert "  lr: 0.1  # base LR (at lr_scaling.base_batch)" in text
    assert "optim:  # optimizer" in text


def test_version_and_help_show_defaults(capsys):
    from bigbatch import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"bigbatch {__version__}"
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    assert "(default: 1)" in capsys.readouterr().out
