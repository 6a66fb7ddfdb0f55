"""Bring your own model and loss: data-derived constructor arguments, model.loss, cwd on sys.path."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from torch.nn import functional as F

from bigbatch.config import ModelConfig
from bigbatch.data.base import DataBundle, TensorSplit
from bigbatch.models.registry import build_model, loss_function
from bigbatch.plugins import PluginError, cwd_on_path
from bigbatch.training.evaluate import evaluate, task_loss
from tests import byo_components as byo

IMAGES = DataBundle(None, None, "classify", (1, 4, 4), 5)
TEXT = DataBundle(None, None, "lm", (12,), 40)
BYO = "tests.byo_components"


def test_a_classifier_gets_the_input_shape_and_class_count_it_names():
    model = build_model(ModelConfig(name=f"{BYO}:ShapeAwareMLP", kwargs={"hidden": 7}), IMAGES)
    assert (model.input_shape, model.num_classes) == ((1, 4, 4), 5)
    assert model(torch.zeros(3, 1, 4, 4)).shape == (3, 5)
    assert model.net[1].out_features == 7  # model.kwargs still reach the constructor


def test_a_language_model_gets_vocabulary_and_window_and_explicit_kwargs_win():
    model = build_model(ModelConfig(name=f"{BYO}:TinyLM"), TEXT)
    assert (model.vocab_size, model.seq_len) == (40, 12)
    padded = build_model(ModelConfig(name=f"{BYO}:TinyLM", kwargs={"vocab_size": 64}), TEXT)
    assert padded.vocab_size == 64  # a padded vocabulary set by hand is kept


def test_a_missing_constructor_argument_is_one_line_naming_model_kwargs():
    with pytest.raises(PluginError) as err:
        build_model(ModelConfig(name=f"{BYO}:NeedsDepth"), IMAGES)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"model.name: {BYO}:NeedsDepth cannot be built (missing a required argument: "
                              "'depth'); the data gave num_classes, set the rest in model.kwargs")
    assert build_model(ModelConfig(name=f"{BYO}:NeedsDepth", kwargs={"depth": 2}), IMAGES).fc.out_features == 5


def test_the_default_loss_is_cross_entropy_and_a_function_or_loss_class_can_replace_it():
    assert loss_function("cross_entropy") is None  # build_trainer then keeps task_loss
    logits, targets = torch.randn(6, 5), torch.randint(0, 5, (6,))
    fn = loss_function(f"{BYO}:half_cross_entropy")
    assert torch.allclose(fn(logits, targets), 0.5 * task_loss(logits, targets))
    smoothed = loss_function(f"{BYO}:SmoothedCE")
    assert torch.allclose(smoothed(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))


@pytest.mark.parametrize("spec, message", [
    (f"{BYO}:no_such_loss", f"model.loss: cannot import '{BYO}:no_such_loss' (module '{BYO}' has no attribute "
                            "'no_such_loss'); check the module is on PYTHONPATH"),
    (f"{BYO}:three_arguments", f"model.loss: {BYO}:three_arguments cannot be called as fn(outputs, targets); "
                               "give it exactly those two arguments"),
    (f"{BYO}:NOT_A_FUNCTION", f"model.loss: '{BYO}:NOT_A_FUNCTION' is defined in an unknown module, not in your "
                              "own code; name a class or function of your package"),
    (f"{BYO}:NeedsWeight", f"model.loss: {BYO}:NeedsWeight() needs arguments"),
    ("os.path:join", "model.loss: 'os.path:join' is in Python's standard library"),
])
def test_a_bad_loss_is_refused_in_one_line(spec, message):
    with pytest.raises(PluginError) as err:
        loss_function(spec)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


class NoComm:
    def all_reduce_sum(self, tensor):  # one process: the sum over ranks is the tensor itself
        return tensor


def test_evaluation_with_a_custom_loss_reports_its_sample_weighted_mean_only():
    torch.manual_seed(0)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    model = torch.nn.Linear(3, 4)
    result = evaluate(model, TensorSplit(x, y), "classify", NoComm(), rank=0, world_size=1, batch_size=4,
                      max_batches=None, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                      loss_fn=byo.half_cross_entropy)
    # batches of 4, 4 and 2 samples: each batch's mean weighted by its size is the mean over all 10
    expected = 0.5 * F.cross_entropy(model(x), y).item()
    assert result.keys() == {"val_loss"}
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_cwd_goes_first_on_sys_path_as_python_m_puts_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    cwd_on_path()
    assert sys.path[0] == str(tmp_path)
    cwd_on_path()  # idempotent
    assert sys.path.count(str(tmp_path)) == 1
