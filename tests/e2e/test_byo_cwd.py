"""`bigbatch train` (the console script) finds a package in the current directory, as `python -m` does;
the model gets its sizes from the data and the package's own loss trains it; a bad loss is exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config, write_config

pytestmark = pytest.mark.e2e
CONSOLE_SCRIPT = Path(sys.executable).parent / "bigbatch"

MODELS = '''
import math
import torch
from torch.nn import functional as F


class Net(torch.nn.Module):
    def __init__(self, input_shape, num_classes, hidden=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), hidden),
                                       torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def offset_loss(outputs, targets):
    """Cross-entropy plus 100: a loss no default could produce."""
    return F.cross_entropy(outputs, targets) + 100.0
'''


@pytest.fixture
def project(tmp_path):
    """A folder holding the package `byo_cwd_pkg` (on no sys.path) and a config naming it."""
    (tmp_path / "byo_cwd_pkg").mkdir()
    (tmp_path / "byo_cwd_pkg" / "__init__.py").write_text("")
    (tmp_path / "byo_cwd_pkg" / "models.py").write_text(MODELS)
    return tmp_path


def train(folder: Path, model: dict) -> subprocess.CompletedProcess:
    config = write_config(folder / "c.yaml", tiny_config(folder, model=model))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(CONSOLE_SCRIPT), "train", str(config)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def test_console_script_trains_a_package_from_the_current_directory_with_its_own_loss(project):
    result = train(project, {"name": "byo_cwd_pkg.models:Net", "loss": "byo_cwd_pkg.models:offset_loss"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (project / "runs" / "tiny" / "metrics.jsonl").open()]
    train_rows = [r for r in rows if r.get("kind", "train") == "train"]
    assert len(train_rows) == 5 and all(100 < r["loss"] < 110 for r in train_rows)
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert 100 < evals[-1]["val_loss"] < 110 and "val_accuracy" not in evals[-1]  # the custom loss's mean only


@pytest.mark.parametrize("loss, message", [
    ("byo_cwd_pkg.models:no_such_fn", "model.loss: cannot import 'byo_cwd_pkg.models:no_such_fn'"),
    ("no_such_pkg_zz.mod:fn", "model.loss: cannot import 'no_such_pkg_zz.mod:fn' (no package 'no_such_pkg_zz')"),
])
def test_a_bad_loss_path_is_exit_2_in_one_line(project, loss, message):
    result = train(project, {"name": "byo_cwd_pkg.models:Net", "loss": loss})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    problem = [line for line in lines if message in line]
    assert len(problem) == 1, result.stderr
    assert "Traceback" not in result.stderr and not (project / "runs" / "tiny" / "metrics.jsonl").exists()
