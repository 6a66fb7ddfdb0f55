"""Large-batch Fashion-MNIST: does LARS or LAMB at batch 8192 match SGD at batch 256 in 1/32 of the steps?

Every row trains the MLP 784-1024-1024-10 on Fashion-MNIST for the same number of epochs (10 and 30),
one process, 2 threads, seed 0, and is evaluated on the 10k test images about 40 times per run (every
100 steps for the batch-256 baseline), so "steps to 0.85" (AlgoPerf-style time to target) has a
resolution of ~1/40 of the run:

    baseline     SGD + momentum 0.9, batch 256, lr 0.1, wd 5e-4, cosine, no warmup
    sgd-linear   the same SGD at batch 8192, lr scaled linearly (x32 = 3.2), 10% warmup
    sgd-sqrt     the same SGD at batch 8192, lr scaled by sqrt (x5.66 = 0.57), 10% warmup
    lars         LARS at batch 8192, lr_scaling linear_then_sqrt, warmup (tuned, see below)
    lamb         LAMB at batch 8192, lr_scaling linear_then_sqrt, warmup (tuned, see below)

    python benchmarks/large_batch.py [--epochs 10 30] [--rows lars lamb] [--seed 0] [--out DIR]
                                     [--set optim.lr=0.02 ...] [--quick]

Output: a table on stdout, OUT/large_batch.{csv,json,png} (accuracy vs steps, log x), one resolved
config per run in OUT/configs/ (also runnable as `bigbatch train OUT/configs/ROW-eE.yaml`) and the
run directories (metrics.jsonl) in OUT/runs/. A row is reproduced by
`python benchmarks/large_batch.py --epochs E --rows ROW --seed S`. A run whose loss becomes
non-finite is stopped there and reported as diverged. `--set` applies to every selected row (the
tuning search below was run that way); `--quick` trains a few hundred samples per row (smoke test).

Hyperparameter search (LARS/LAMB)
---------------------------------
One setting changed at a time, seed 0, final test accuracy (baseline: 0.8978 at 10 epochs, 0.9032 at
30), with `--epochs E --rows ROW --set KEY=VALUE`. LAMB from lr 0.0035 (peak 0.056), 10% warmup,
cosine, wd 0.01; LARS from lr 1.0 (peak 16), trust_coefficient 0.001, 10% warmup, cosine, wd 5e-4:

    30 epochs                                    10 epochs
    lamb lr 0.005 (peak 0.08)   0.1000 (dead)    lamb lr 0.0035               0.8692
    lamb lr 0.0035 (0.056)      0.8768           lamb lr 0.003                0.8689
    lamb lr 0.0025 (0.04)       0.8932           lamb lr 0.004                0.8684
    lamb lr 0.002 (0.032) ROW   0.8972           lamb lr 0.002 (ROW)          0.8630
    lamb lr 0.0015 (0.024)      0.8974           lamb lr 0.0035, warmup 5%    0.8707
    lamb lr 0.002, linear decay 0.8975           lamb lr 0.0035, warmup 20%   0.8685
    lamb lr 0.002, warmup 20%   0.8978           lamb lr 0.0035, linear       0.8749
    lamb lr 0.0025, b2 0.99     0.8949           lamb lr 0.002, linear        0.8672
    lamb lr 0.0025, wd 0.1      0.8960           lamb lr 0.0035, b2 0.99      0.8675
    lamb lr 0.0035, wd 0.1      0.8785           lamb lr 0.0035, b2 0.95      0.8703
    lamb lr 0.0035, warmup 20%  0.8795
    lars lr 1.0 (peak 16)       0.8867           lars lr 1.0                  0.8365
    lars lr 2.0                 0.8766           lars lr 2.0, warmup 20%      0.8245
    lars lr 0.5                 0.8816           lars tc 0.01, lr 0.1 (ROW)   0.8539
    lars warmup 20%             0.8746
    lars nesterov               0.8874
    lars tc 0.01, lr 0.1 (ROW)  0.8898

LAMB is sensitive to the peak LR at this batch (0.056 loses 2.6 points at 30 epochs, 0.08 collapses
to chance); 0.024-0.032 is the plateau for 30 epochs, while 10 epochs (74 steps) prefer about 0.056.
One LR serves both budgets here, tuned for 30. LARS does better with a 10x trust coefficient and a
10x smaller LR (the same product), which keeps the global LR in a range the momentum buffer tolerates.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from bigbatch.launch.runtime import Runtime
from bigbatch.metrics import METRICS_FILE, read_metrics
from bigbatch.optim.lr_scaling import peak_lr

OUT = Path(__file__).parent / "out"
TARGET = 0.85
BASE_BATCH, LARGE_BATCH = 256, 8192
EVALS_PER_RUN = 40  # rows without a fixed eval period are evaluated about this often
THREADS = 2

BASE_SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


@dataclass(frozen=True)
class Row:
    """One benchmark configuration: its optimizer and LR sections and batch; the rest is shared."""

    name: str
    batch: int
    optim: dict
    lr: dict
    eval_every: Optional[int] = None  # None: about EVALS_PER_RUN evaluations per run


ROWS = (
    Row("baseline", BASE_BATCH, BASE_SGD, {"name": "cosine"}, eval_every=100),
    Row("sgd-linear", LARGE_BATCH, {**BASE_SGD, "lr_scaling": {"rule": "linear"}},
        {"name": "cosine", "warmup_fraction": 0.1}),
    Row("sgd-sqrt", LARGE_BATCH, {**BASE_SGD, "lr_scaling": {"rule": "sqrt"}},
        {"name": "cosine", "warmup_fraction": 0.1}),
    Row("lars", LARGE_BATCH,
        {"name": "lars", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.01,
         "lr_scaling": {"rule": "linear_then_sqrt", "knee_batch": 2048}},
        {"name": "cosine", "warmup_fraction": 0.1}),
    Row("lamb", LARGE_BATCH,
        {"name": "lamb", "lr": 0.002, "weight_decay": 0.01,
         "lr_scaling": {"rule": "linear_then_sqrt", "knee_batch": 2048}},
        {"name": "cosine", "warmup_fraction": 0.1}),
)
ROW_NAMES = tuple(row.name for row in ROWS)


@dataclass
class Result:
    """What one run produced: the table's numbers plus the evaluation curve for the plot."""

    row: str
    epochs: float
    batch: int
    optimizer: str
    peak_lr: float
    steps: int
    final_acc: Optional[float]
    steps_to_target: Optional[int]
    diverged_at: Optional[int]
    wall_s: float
    cpu_s: float  # process CPU time: on a shared machine, wall time alone misleads
    command: str
    curve: list[tuple[int, float]] = field(default_factory=list)
    gap_points: Optional[float] = None


class Diverged(RuntimeError):
    """Raised from an after-step hook when the training loss stops being finite."""

    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


def stop_on_divergence(trainer) -> dict:
    """Trainer after-step hook: a NaN/inf loss means the run diverged; computing on is wasted time."""
    if not math.isfinite(trainer.last_loss):
        raise Diverged(trainer.counters.step)
    return {}


def set_dotted(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested config dict."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set optim.lr=0.02")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {part} is not a config section")
    node[leaf] = yaml.safe_load(value)


def planned_steps(batch: int, samples: int) -> int:
    return math.ceil(samples / batch)  # the trainer stops once the sample budget is reached


def row_config(row: Row, epochs: float, out: Path, seed: int, overrides: list[str], quick: bool) -> dict:
    """The full run config of `row`; quick mode trains a few hundred samples with a capped eval."""
    name = f"{row.name}-e{epochs:g}"
    samples = 512 if quick else int(epochs * 60_000)
    steps = planned_steps(row.batch, samples)
    every = 1 if quick else row.eval_every or max(1, math.ceil(steps / EVALS_PER_RUN))
    raw = {
        "run": {"name": name, "out_dir": str(out / "runs"), "seed": seed, "epochs": epochs},
        "data": {"name": "fashion_mnist"},
        "model": {"name": "mlp", "hidden": [1024, 1024]},
        "optim": copy.deepcopy(row.optim), "lr": copy.deepcopy(row.lr),
        "batch": {"global_batch": row.batch},
        "eval": {"every_steps": every, "batch_size": 2500},
        "checkpoint": {"at_end": False, "resume": "never"},
        "metrics": {"tensorboard": False, "progress": "none"},
    }
    if quick:
        raw["run"]["max_samples"] = samples
        raw["eval"].update(batch_size=500, max_batches=1)
    for item in overrides:
        set_dotted(raw, item)
    return raw


def reproduce_command(row: Row, epochs: float, seed: int, overrides: list[str]) -> str:
    sets = "".join(f" --set {item}" for item in overrides)
    return f"python benchmarks/large_batch.py --epochs {epochs:g} --rows {row.name} --seed {seed}{sets}"


def train(raw: dict) -> tuple[Optional[int], float, float]:
    """Run one config in this process; returns (divergence step or None, wall s, CPU s)."""
    cfg = validate_config(raw)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # metrics.jsonl appends: start each run clean
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer = build_trainer(cfg, Runtime(0, 1, 0, torch.device("cpu"), None))
    trainer.after_step.append(stop_on_divergence)
    trainer.loss_every = 1  # stop_on_divergence reads each step's loss (without the guard it is read every N)
    diverged_at = None
    try:
        trainer.fit()
    except Diverged as err:
        diverged_at = err.step
    finally:
        trainer.metrics.close()
    return diverged_at, time.perf_counter() - start, time.process_time() - cpu_start


def steps_to_target(curve: list[tuple[int, float]], target: float) -> Optional[int]:
    """First evaluated step whose accuracy reaches `target` (None if none does)."""
    return next((step for step, acc in curve if acc >= target), None)


def run_row(row: Row, epochs: float, out: Path, seed: int, overrides: list[str], quick: bool) -> Result:
    raw = row_config(row, epochs, out, seed, overrides, quick)
    cfg_dir = out / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{raw['run']['name']}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    diverged_at, wall, cpu = train(raw)
    cfg = validate_config(raw)
    rows = read_metrics(cfg.run_dir / METRICS_FILE)
    curve = [(r["step"], r["val_accuracy"]) for r in rows if r.get("kind") == "eval"]
    steps = max((r["step"] for r in rows if "loss" in r and r.get("kind") is None), default=0)
    scaling = cfg.optim.lr_scaling
    peak = peak_lr(cfg.optim.lr, cfg.batch.global_batch, scaling.rule, scaling.base_batch, scaling.knee_batch)
    final = None if diverged_at is not None or not curve else curve[-1][1]
    return Result(row.name, epochs, cfg.batch.global_batch, cfg.optim.name, peak, steps, final,
                  steps_to_target(curve, TARGET), diverged_at, wall, cpu,
                  reproduce_command(row, epochs, seed, overrides), curve)


def fill_gaps(results: list[Result]) -> None:
    """Gap to the baseline of the same epoch budget, in accuracy points (positive = worse)."""
    base = {r.epochs: r.final_acc for r in results if r.row == "baseline"}
    for r in results:
        if base.get(r.epochs) is not None and r.final_acc is not None:
            r.gap_points = 100 * (base[r.epochs] - r.final_acc)


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: list[Result]) -> str:
    head = (f"{'row':<11}{'epochs':>7}{'batch':>7}{'optimizer':>10}{'peak lr':>9}{'steps':>7}"
            f"{'final acc':>11}{'steps to ' + str(TARGET):>14}{'gap (pts)':>11}{'wall s':>8}{'cpu s':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        final = f"div@{r.diverged_at}" if r.diverged_at is not None else _fmt(r.final_acc, ".4f")
        lines.append(f"{r.row:<11}{r.epochs:>7g}{r.batch:>7}{r.optimizer:>10}{r.peak_lr:>9.4g}{r.steps:>7}"
                     f"{final:>11}{_fmt(r.steps_to_target, 'd', 'never'):>14}"
                     f"{_fmt(r.gap_points, '+.2f'):>11}{r.wall_s:>8.0f}{r.cpu_s:>8.0f}")
    return "\n".join(lines)


def write_results(results: list[Result], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    records = [vars(r) for r in results]
    (out / "large_batch.json").write_text(json.dumps(records, indent=1))
    columns = [k for k in records[0] if k != "curve"]
    with open(out / "large_batch.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot(results: list[Result], path: Path) -> None:
    """Test accuracy vs optimizer steps (log x), one panel per epoch budget, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r.epochs for r in results})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, epochs in zip(axes[0], budgets):
        for r in (r for r in results if r.epochs == epochs):
            if r.curve:
                steps, accs = zip(*r.curve)
                ax.plot(steps, accs, marker="." if len(steps) < 60 else None,
                        label=f"{r.row} (B={r.batch}, {r.optimizer})")
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET}")
        ax.set_xscale("log")
        ax.set_ylim(0.5, 0.95)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"Fashion-MNIST MLP, {epochs:g} epochs")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, nargs="+", default=[10, 30], help="epoch budgets")
    parser.add_argument("--rows", nargs="+", default=list(ROW_NAMES), help=f"subset of {', '.join(ROW_NAMES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every selected row (repeatable)")
    parser.add_argument("--quick", action="store_true", help="512 samples per row, one budget (smoke test)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.rows) - set(ROW_NAMES))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROW_NAMES)}")
    if any(e <= 0 for e in args.epochs):
        parser.error("--epochs: every budget must be > 0, e.g. --epochs 10 30")
    if args.quick:
        args.epochs = args.epochs[:1]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    rows = [row for row in ROWS if row.name in args.rows]
    results = []
    for epochs in args.epochs:
        for row in rows:
            result = run_row(row, epochs, args.out, args.seed, args.overrides, args.quick)
            print(f"[{row.name} {epochs:g} ep] final {_fmt(result.final_acc, '.4f')}  steps {result.steps}  "
                  f"to {TARGET}: {_fmt(result.steps_to_target, 'd', 'never')}  {result.wall_s:.0f} s", flush=True)
            results.append(result)
    fill_gaps(results)
    print(format_table(results))
    write_results(results, args.out)
    plot(results, args.out / "large_batch.png")
    print(f"results: {args.out / 'large_batch.csv'}, {args.out / 'large_batch.json'}; "
          f"plot: {args.out / 'large_batch.png'}")
    print("reproduce a row: " + (results[0].command if results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
