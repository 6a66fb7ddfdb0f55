"""Validation of the streaming-DiLoCo and pseudo-gradient quantization keys (exit 2, naming the key)."""

from __future__ import annotations

from bigbatch.validate import load_config
from tests.conftest import tiny_config, write_config
from tests.e2e.test_cli_launch import bigbatch
from tests.unit.test_validate import problems_of


def diloco(tmp_path, **keys) -> dict:
    return tiny_config(tmp_path, distributed={"strategy": "diloco"}, diloco={"inner_steps": 6, **keys})


def test_sync_delay_must_be_below_the_steps_between_fragment_syncs(tmp_path):
    # H = 6, 2 fragments: syncs 3 steps apart, so tau <= 2
    load_config(write_config(tmp_path / "ok.yaml", diloco(tmp_path, fragments=2, sync_delay=2)))
    [problem] = problems_of(tmp_path, diloco(tmp_path, fragments=2, sync_delay=3))
    assert problem == ("diloco.sync_delay: 3 must be below diloco.inner_steps // diloco.fragments = 6 // 2 = 3, "
                       "the steps between two fragments' syncs; set diloco.sync_delay to at most 2")
    # H = 7, 2 fragments: syncs at 3 and 7, 3 and 4 steps apart; the smaller gap counts
    [problem] = problems_of(tmp_path, diloco(tmp_path, inner_steps=7, fragments=2, sync_delay=3))
    assert problem.startswith("diloco.sync_delay: 3 must be below diloco.inner_steps // diloco.fragments = 7 // 2")


def test_mixing_one_keeps_local_weights_and_is_valid(tmp_path):
    cfg = load_config(write_config(tmp_path / "ok.yaml", diloco(tmp_path, fragments=2, mixing=1.0)))
    assert cfg.diloco.mixing == 1.0
    [problem] = problems_of(tmp_path, diloco(tmp_path, mixing=1.5))
    assert problem.startswith("diloco.mixing")


def test_bad_sync_delay_exits_2_naming_the_key(tmp_path):
    config = write_config(tmp_path / "c.yaml", diloco(tmp_path, fragments=3))
    result = bigbatch("train", str(config), "--set", "diloco.sync_delay=2")
    assert result.returncode == 2
    assert "diloco.sync_delay: 2 must be below diloco.inner_steps // diloco.fragments = 6 // 3 = 2" in result.stderr


def test_quantized_pseudo_gradients_are_diloco_only(tmp_path):
    raw = diloco(tmp_path, compression={"method": "int4", "block_size": 0})
    assert load_config(write_config(tmp_path / "ok.yaml", raw)).diloco.compression.block_size == 0
    [problem] = problems_of(tmp_path, tiny_config(tmp_path, compression={"method": "int8"}))
    assert problem.startswith("compression.method: 'int8' compresses DiLoCo pseudo-gradients only "
                              "(diloco.compression.method); choose one of none, fp16, bf16, powersgd")
    [problem] = problems_of(tmp_path, diloco(tmp_path, compression={"method": "int8", "block_size": -1}))
    assert problem.startswith("diloco.compression.block_size")


def test_quantized_powersgd_factors_of_pseudo_gradients(tmp_path):
    raw = diloco(tmp_path, compression={"method": "powersgd", "rank": 4, "factor_bits": 8})
    assert load_config(write_config(tmp_path / "ok.yaml", raw)).diloco.compression.factor_bits == 8
    [problem] = problems_of(tmp_path, diloco(tmp_path, compression={"method": "fp16", "factor_bits": 4}))
    assert problem.startswith("diloco.compression.factor_bits: quantized P and Q are for method powersgd "
                              "(method is 'fp16'); for quantized pseudo-gradients set method: int8 or int4")
