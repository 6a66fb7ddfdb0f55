"""Issue 13, item 11: a config names code to run, so what it may name is checked before anything runs.

`model.name: os:system` used to run a shell command and `--print-config` imported user modules. Now
validation never imports user code, the standard library and builtins are refused, and a model must be
an nn.Module subclass and a data builder a callable of the user's own code, checked before the call.
"""

from __future__ import annotations

import sys

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config import DataConfig, ModelConfig
from bigbatch.data.base import DataBundle
from bigbatch.data.registry import build_data
from bigbatch.models.registry import build_model
from bigbatch.plugins import PluginError, load_plugin, plugin_problems
from tests.conftest import tiny_config, write_config

DATA = DataBundle(None, None, "classify", (8,), 3)

USER_MODULE = '''
import pathlib, torch
from os import system
pathlib.Path({marker!r}).write_text("imported")

class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))

def make_net(**kwargs):
    pathlib.Path({marker!r}).write_text("called")
    return Net()

NOT_CALLABLE = 3

class Thing:
    pass

THING = Thing()
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """An importable package `userpkg_<test>` whose import writes a marker file; returns (name, marker)."""
    name = f"userpkg_{abs(hash(str(tmp_path))) % 10**8}"
    marker = tmp_path / "marker"
    (tmp_path / "src" / name).mkdir(parents=True)
    (tmp_path / "src" / name / "__init__.py").write_text("")
    (tmp_path / "src" / name / "models.py").write_text(USER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield name, marker
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


@pytest.mark.parametrize("command", [["--print-config"], []], ids=["print-config", "train"])
@pytest.mark.parametrize("section, name", [("model", "os:system"), ("data", "subprocess:run"),
                                           ("model", "builtins:eval"), ("data", "os.path:join")])
def test_the_standard_library_is_refused_before_anything_runs(tmp_path, capsys, command, section, name):
    marker = tmp_path / "pwned"
    raw = tiny_config(tmp_path, **{section: {"name": name, "kwargs": {"command": f"touch {marker}"}}})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw)), *command]) == 2
    err = capsys.readouterr().err
    assert f"  - {section}.name: '{name}' is in Python's standard library; name a class or function of " \
           "your own package" in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_print_config_and_validation_never_import_user_code(tmp_path, capsys, user_pkg):
    name, marker = user_pkg
    raw = tiny_config(tmp_path, model={"name": f"{name}.models:Net"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw)), "--print-config"]) == 0
    assert f"name: {name}.models:Net" in capsys.readouterr().out
    assert not marker.exists() and f"{name}.models" not in sys.modules


def test_a_package_that_cannot_be_found_is_a_config_error_without_importing(tmp_path):
    assert plugin_problems("model.name", "no_such_pkg_zz.mod:Net", ("mlp",)) == [
        "model.name: cannot import 'no_such_pkg_zz.mod:Net' (no package 'no_such_pkg_zz'); check the module "
        "is on PYTHONPATH"]
    assert plugin_problems("data.name", "pkg.mod:a:b", ()) == [
        "data.name: 'pkg.mod:a:b' is not an import path 'package.module:attribute'"]


def test_a_model_class_is_built_and_a_model_function_is_refused_uncalled(user_pkg):
    name, marker = user_pkg
    model = build_model(ModelConfig(name=f"{name}.models:Net"), DATA)
    assert model(torch.zeros(2, 8)).shape == (2, 3)
    with pytest.raises(PluginError, match=f"model.name: '{name}.models:make_net' is a function, not a "
                                          "torch.nn.Module subclass"):
        build_model(ModelConfig(name=f"{name}.models:make_net"), DATA)
    assert marker.read_text() == "imported"  # the module ran, make_net did not


def test_a_stdlib_function_reached_through_user_code_is_refused(user_pkg):
    name, _ = user_pkg
    for section, build in (("model", lambda n: build_model(ModelConfig(name=n), DATA)),
                           ("data", lambda n: build_data(DataConfig(name=n), 0))):
        with pytest.raises(PluginError, match=f"{section}.name: '{name}.models:system' is defined in "
                                              "posix, not in your own code"):
            build(f"{name}.models:system")


def test_a_data_builder_must_be_callable(user_pkg):
    name, _ = user_pkg
    with pytest.raises(PluginError, match="is defined in an unknown module"):
        load_plugin("data.name", f"{name}.models:NOT_CALLABLE")  # an int has no home module
    with pytest.raises(PluginError, match=f"data.name: '{name}.models:THING' is a Thing, not a function"):
        build_data(DataConfig(name=f"{name}.models:THING"), 0)


def test_the_train_command_refuses_a_non_module_model_with_exit_2(tmp_path, capsys, user_pkg):
    name, marker = user_pkg
    raw = tiny_config(tmp_path, model={"name": f"{name}.models:make_net"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert f"model.name: '{name}.models:make_net' is a function" in capsys.readouterr().err
    assert marker.read_text() == "imported" and not (tmp_path / "runs").exists()
