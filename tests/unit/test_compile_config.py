"""model.compile in the schema: accepted with every strategy but deepspeed, refused there naming the key."""

from __future__ import annotations

import pytest

from bigbatch.checkpoint.rundir import may_change
from bigbatch.config import ConfigError
from bigbatch.validate import validate_config
from tests.conftest import tiny_config


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "diloco"])
def test_compile_is_accepted(tmp_path, strategy):
    cfg = validate_config(tiny_config(tmp_path, model={"compile": True}, distributed={"strategy": strategy}))
    assert cfg.model.compile is True


def test_compile_with_deepspeed_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_config(tmp_path, model={"compile": True}, distributed={"strategy": "deepspeed"}))
    [problem] = [p for p in err.value.problems if "compile" in p]
    assert problem.startswith("model.compile: not supported with distributed.strategy deepspeed")


def test_compile_and_prefetch_may_change_on_resume():
    # neither changes what a checkpoint holds: compiled and eager runs load each other's checkpoints
    assert may_change("model.compile") and may_change("data.prefetch") and not may_change("model.hidden")
