"""Smoke test of benchmarks/comm_savings.py --quick: 2 ranks in network namespaces, table and PNG,
and nothing left behind (namespaces, rank processes), also when interrupted with Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from benchmarks.netns_ranks import netns_problem
from tests.conftest import REPO, needs_fashion_mnist, processes_mentioning

pytestmark = [pytest.mark.e2e, needs_fashion_mnist]

BENCH = REPO / "benchmarks" / "comm_savings.py"

# --quick trains ResNet(width 8, blocks [1, 1]) on 1x8x8 inputs. Its parameters, with the elements
# PowerSGD rank 2 sends for each: a gradient viewed as n x m (shape[0] x the rest) is sent as
# P (n x 2) + Q (m x 2) when n*m >= 2 * (n + m) * 2, whole otherwise (all 1-D tensors).
TINY_RESNET = [  # (shape, elements sent at rank 2)
    ((8, 1, 3, 3), (8 + 9) * 2),       # stem conv: 72 >= 68
    ((8,), 8), ((8,), 8),              # stem batch norm
    ((8, 8, 3, 3), (8 + 72) * 2),      # stage 1 conv1
    ((8,), 8), ((8,), 8),
    ((8, 8, 3, 3), (8 + 72) * 2),      # stage 1 conv2
    ((8,), 8), ((8,), 8),
    ((16, 8, 3, 3), (16 + 72) * 2),    # stage 2 conv1 (stride 2)
    ((16,), 16), ((16,), 16),
    ((16, 16, 3, 3), (16 + 144) * 2),  # stage 2 conv2
    ((16,), 16), ((16,), 16),
    ((16, 8, 1, 1), (16 + 8) * 2),     # stage 2 shortcut conv: 128 >= 96
    ((16,), 16), ((16,), 16),
    ((10, 16), (10 + 16) * 2),         # head: 160 >= 104
    ((10,), 10),
]


def bb_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith("bb-")]


@pytest.fixture
def netns_ok():
    problem = netns_problem()
    if problem:
        pytest.skip(problem)


def test_quick_run_writes_table_and_png_and_cleans_up(tmp_path, netns_ok):
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "comm_savings.json").read_text())["rows"]}
    assert list(rows) == ["compute-only", "all-reduce", "powersgd r2"]

    dense = 4 * sum(_numel(shape) for shape, _ in TINY_RESNET)
    compressed = 4 * sum(sent for _, sent in TINY_RESNET)
    assert dense == 4 * 5122 and compressed == 4 * 1104
    plain, psgd, limit = rows["all-reduce"], rows["powersgd r2"], rows["compute-only"]
    assert plain["bytes"] == plain["bytes_analytic"] == dense       # measured by the metrics, and the rule
    assert psgd["bytes"] == psgd["bytes_analytic"] == compressed
    assert psgd["fewer"] == pytest.approx(dense / compressed)
    for row in (plain, psgd):
        assert row["step_s"] > 0 and row["compute_s"] == limit["step_s"] > 0
        assert row["exposed_s"] == pytest.approx(row["step_s"] - limit["step_s"])
        assert row["speedup"] == pytest.approx(plain["step_s"] / row["step_s"])
        assert 0 <= row["val_accuracy"] <= 1

    table = (tmp_path / "comm_savings.md").read_text()
    assert "| method | rate | bytes/step (measured) |" in table
    for label in rows:
        assert f"| {label} | 1gbit |" in table
    assert "goal >= 100x fewer bytes at rank 2" in table
    assert (tmp_path / "comm_savings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bb_namespaces() == [] and processes_mentioning(str(tmp_path / "comm_savings_runs")) == []


def test_ctrl_c_kills_the_ranks_and_removes_the_namespaces(tmp_path, netns_ok):
    bench = subprocess.Popen([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in bench.stdout:  # blocks until the first ranks are running inside the namespaces
            if "started pids" in line:
                break
        assert bb_namespaces(), "the cluster should be up while ranks run"
        assert processes_mentioning(str(tmp_path / "comm_savings_runs")), "the ranks should be running"
        bench.send_signal(signal.SIGINT)
        output = bench.communicate(timeout=60)[0]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 130, output
    assert "interrupted" in output
    assert bb_namespaces() == [] and processes_mentioning(str(tmp_path)) == []  # ranks and benchmark


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count
