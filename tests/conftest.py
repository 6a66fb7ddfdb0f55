"""Shared fixtures: tiny configs that train in seconds on synthetic data.

Tiers: every test gets the marker of its top folder (`unit`, `distributed`, `e2e`, `integration`,
`reliability`, `gpu`), so a new test file lands in its tier without a decorator; `slow` is per test;
tests marked `gpu` are skipped where CUDA is not available. The Makefile's test targets select with `-m`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.register_assert_rewrite("tests.unit.optim_helpers")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
REPO = Path(__file__).resolve().parents[1]



def run_benchmark(script: str, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT ARGS` in `cwd`, the repo importable, output captured."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=cwd)


needs_fashion_mnist = pytest.mark.skipif(not FASHION_MNIST.exists(),
                                         reason="apt-get install dataset-fashion-mnist")

TIER_FOLDERS = ("unit", "distributed", "e2e", "integration", "reliability", "gpu")  # each is a marker


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    tests = Path(__file__).parent
    cuda = None
    for item in items:
        folder = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else None
        if folder in TIER_FOLDERS:
            item.add_marker(folder)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch
                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def tiny_config(tmp_path: Path, **sections) -> dict:
    """A synthetic-data MLP run of a few steps; keyword arguments replace whole sections' keys."""
    raw = {
        "run": {"name": "tiny", "out_dir": str(tmp_path / "runs"), "seed": 3, "max_steps": 5},
        "data": {"name": "synthetic", "shape": [8], "num_classes": 3, "num_samples": 256,
                 "val_fraction": 0.25},
        "model": {"name": "mlp", "hidden": [16]},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "batch": {"global_batch": 16},
        "metrics": {"tensorboard": False, "progress": "none"},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def processes_mentioning(text: str) -> list[int]:
    """Live processes (other than this one) whose command line contains `text`, e.g. a benchmark's
    unique temporary folder: what a test checks is gone after the benchmark ends or is interrupted."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # not a process, or it just exited
            continue
        if proc.name.isdigit() and text in cmdline and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found
