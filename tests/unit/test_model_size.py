"""A hostile model size is one line naming the model keys (exit 2), before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bigbatch.models.size as size
from bigbatch.cli import main
from bigbatch.config import ConfigError, DataConfig, ModelConfig
from bigbatch.data.registry import build_data
from bigbatch.models.registry import build_model
from tests.conftest import tiny_config, write_config


def synthetic(shape):
    return build_data(DataConfig(name="synthetic", shape=shape, num_classes=10, num_samples=64), seed=0)


@pytest.mark.parametrize("model", [ModelConfig(name="mlp", hidden=[32, 16]),
                                   ModelConfig(name="resnet", width=4, blocks=[1, 2])])
def test_counted_on_meta_as_many_parameters_as_the_real_model(model):
    data = synthetic([3, 8, 8])
    real = sum(p.numel() for p in build_model(model, data).parameters())
    assert size.parameter_count(model, data) == real


def test_refused_exactly_when_weights_and_gradients_exceed_the_memory(monkeypatch):
    data, model = synthetic([8]), ModelConfig(name="mlp", hidden=[32])
    need = 8 * (8 * 32 + 32 + 32 * 10 + 10)  # float32 weights + gradients of 8 -> 32 -> 10
    monkeypatch.setattr(size, "memory_bytes", lambda device: need)
    size.check_model_fits(model, data, torch.device("cpu"))
    monkeypatch.setattr(size, "memory_bytes", lambda device: need - 1)
    with pytest.raises(ConfigError, match=r"model.hidden: the model has 618 parameters; .* make the model smaller"):
        size.check_model_fits(model, data, torch.device("cpu"))


class NotOnMeta(nn.Module):
    """A custom model that reads a tensor value while it is built (impossible on the meta device)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.linear = nn.Linear(input_shape[0], num_classes)
        self.scale = float(self.linear.weight.abs().max().item())


def test_a_custom_model_that_cannot_be_built_on_meta_is_left_to_its_real_build(monkeypatch):
    monkeypatch.setattr(size, "build_model", lambda cfg, data: NotOnMeta((8,), 3))
    assert size.parameter_count(ModelConfig(), synthetic([8])) is None


def test_a_width_of_a_billion_is_one_line_and_nothing_written(tmp_path, capsys):
    raw = tiny_config(tmp_path, model={"hidden": [10**9]})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    assert "model.hidden: the model has 12,000,000,003 parameters" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_layer_counts_are_bounded_by_the_schema(tmp_path):
    for model in ({"name": "gpt", "n_layer": 10**6}, {"name": "resnet", "blocks": [1] * 9}):
        raw = tiny_config(tmp_path, model=model)
        assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert not (tmp_path / "runs").exists()
