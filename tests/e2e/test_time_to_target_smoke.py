"""Smoke test of benchmarks/time_to_target.py --quick: sgd and muon at two batches on the tiny MLP and a
tiny GPT (a small text written here); the table, markdown, JSON and PNG, and steps/samples that agree
with each other and with the runs' evaluations."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_fashion_mnist

pytestmark = [pytest.mark.e2e]

BENCH = REPO / "benchmarks" / "time_to_target.py"
QUICK = {"mlp": ((32, 256), 1024), "gpt": ((4, 32), 256)}  # --quick: batches and samples per run


@needs_fashion_mnist
@pytest.mark.timeout(240)
def test_quick_run_reports_consistent_steps_and_samples(tmp_path):
    random.seed(0)
    words = "to be or not that is the question whether tis nobler in the mind to suffer".split()
    (tmp_path / "corpus.txt").write_text(" ".join(random.choice(words) for _ in range(3000)))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--workloads", "mlp", "gpt", "--corpus",
                             str(tmp_path / "corpus.txt"), "--out", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=230)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    lines = result.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("workload") and "samples to target" in line)
    table = [line.split() for line in lines[head + 2:head + 10]]
    assert [(c[0], c[1], int(c[2])) for c in table] == [
        (w, o, b) for w in ("mlp", "gpt") for o in ("sgd", "muon") for b in QUICK[w][0]]
    for cells in table:  # workload optimizer batch lr steps steps-to samples-to final wall
        batch, steps = int(cells[2]), int(cells[4])
        assert steps == math.ceil(QUICK[cells[0]][1] / batch)  # equal samples at both batches
        if cells[5] != "never":
            assert 1 <= int(cells[5]) <= steps and int(cells[6]) == int(cells[5]) * batch

    data = json.loads((out / "time_to_target.json").read_text())
    runs = data["runs"]
    assert len(runs) == 8 and all(r["best"] for r in runs)  # --quick: one LR each, so each is the best
    assert any(r["samples_to_target"] is not None for r in runs if r["workload"] == "mlp")
    for r in runs:
        target = data["targets"][r["workload"]]
        assert r["samples"] == r["steps"] * r["batch"] and r["diverged_at"] is None
        evaluated = [s for s, _ in r["curve"]]
        assert evaluated[-1] == r["samples"] and all(s % r["batch"] == 0 for s in evaluated)
        reached = [s for s, v in r["curve"]
                   if (v >= target["target"] if target["higher_is_better"] else v <= target["target"])]
        if r["samples_to_target"] is None:
            assert reached == []
        else:
            # the crossing lies between the last evaluation short of the target and the first reaching it
            assert r["samples_to_target"] == r["steps_to_target"] * r["batch"] <= reached[0]
            before = [s for s in evaluated if s < reached[0]]
            assert r["samples_to_target"] > (before[-1] if before else 0)

    md = (out / "time_to_target.md").read_text()
    assert "| mlp | sgd | 32 |" in md and "Every run of the sweep" in md
    assert (out / "time_to_target.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crossing_is_interpolated_and_rounded_up_to_a_step():
    from benchmarks.time_to_target import Workload, to_target

    acc = Workload("mlp", (32, 1024), 2048, "val_accuracy", 0.85, True)
    # 0.5 at 100 samples, 0.9 at 200: crossing at 100 + 100 * 0.35 / 0.4 = 187.5 -> step 6 of 32
    assert to_target(acc, 32, [(100, 0.5), (200, 0.9)]) == (6, 192)
    assert to_target(acc, 32, [(64, 0.86)]) == (2, 64)  # the first evaluation already reaches it
    assert to_target(acc, 32, [(64, 0.5), (128, 0.8)]) == (None, None)
    loss = Workload("gpt", (4, 128), 512, "val_loss", 2.0, False)
    assert to_target(loss, 4, [(40, 3.0), (80, 1.0)]) == (15, 60)  # crossing at exactly 60 samples


def test_best_lr_is_fewest_samples_to_target_else_best_final():
    from benchmarks.time_to_target import Run, Workload, best_run

    work = Workload("gpt", (4, 128), 512, "val_loss", 2.0, False)

    def run(lr, final, samples_to, diverged=None):
        return Run("gpt", "adamw", 4, lr, 128, 512, final, None if samples_to is None else samples_to // 4,
                   samples_to, diverged, 1.0, 1.0)

    assert best_run(work, [run(1, 1.5, 400), run(2, 1.9, 200), run(3, None, None, 7)]).lr == 2
    assert best_run(work, [run(1, 2.5, None), run(2, 2.2, None), run(3, None, None, 7)]).lr == 2
    assert best_run(work, [run(1, None, None, 3), run(2, None, None, 5)]).lr == 1


def test_bad_arguments_exit_2_naming_the_option():
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--lrs", "0", "--out", "/nonexistent"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--lrs/--lr-factors: every LR must be > 0" in result.stderr


def test_merge_races_the_runs_of_several_sweeps_together(tmp_path, capsys):
    from benchmarks.time_to_target import Run, Workload, main, write_outputs

    work = Workload("gpt", (4, 128), 512, "val_loss", 2.0, False)

    def run(optimizer, batch, lr, final, samples_to):
        steps_to = None if samples_to is None else samples_to // batch
        return Run("gpt", optimizer, batch, lr, 512 // batch, 512, final, steps_to, samples_to, None, 1.0, 1.0,
                   [(256, 2.5), (512, final)])

    # first sweep: muon's grid, and adamw whose best lr 0.01 sits at the grid's upper edge
    write_outputs([work], [run("muon", 4, 0.01, 1.8, 300), run("adamw", 4, 0.003, 2.1, None),
                           run("adamw", 4, 0.01, 1.9, 400)], [], tmp_path / "a", "sweep a")
    # the grid extended upwards for adamw: 0.03 reaches 2.0 sooner and becomes the best
    write_outputs([work], [run("adamw", 4, 0.03, 1.95, 320)], [], tmp_path / "b", "sweep b")
    assert main(["--merge", str(tmp_path / "a" / "time_to_target.json"), str(tmp_path / "b" / "time_to_target.json"),
                 "--out", str(tmp_path / "m")]) == 0
    data = json.loads((tmp_path / "m" / "time_to_target.json").read_text())
    assert len(data["runs"]) == 4 and data["targets"]["gpt"]["target"] == 2.0
    assert sorted((r["optimizer"], r["lr"]) for r in data["runs"] if r["best"]) == [("adamw", 0.03), ("muon", 0.01)]
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in table if line.startswith("gpt ")] == ["adamw", "muon"]  # OPTIMIZERS order
    assert (tmp_path / "m" / "time_to_target.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a sweep of another budget is not the same race
    other = Workload("gpt", (4, 128), 1024, "val_loss", 2.0, False)
    write_outputs([other], [run("sgd", 4, 0.1, 1.9, 400)], [], tmp_path / "c", "sweep c")
    assert main(["--merge", str(tmp_path / "a" / "time_to_target.json"), str(tmp_path / "c" / "time_to_target.json"),
                 "--out", str(tmp_path / "n")]) == 2
    assert "merge only sweeps of the same workload settings" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
