"""Does gradient compression pay off in wall-clock time on a slow link? 2 ranks, emulated network.

Each rank runs in its own network namespace (`scripts/netns-cluster.sh up 2 RATE`, removed when the
benchmark ends, fails or is interrupted) and talks gloo over a veth pair shaped to RATE both ways.
Every run is the real trainer, `scripts/netns-run.sh I env ... python -m bigbatch train CONFIG`, one
process per rank with OMP_NUM_THREADS=1, on the same fixed sample budget; the numbers come from the
rank-0 `metrics.jsonl`.

    python benchmarks/comm_savings.py [--rates 100mbit 1gbit] [--steps 40] [--per-rank-batch 24]
                                      [--methods all-reduce "powersgd r2" ...] [--out DIR] [--quick]
    python benchmarks/comm_savings.py --profile     # compression compute only: one process, no root

Needs root (network namespaces, tc) and Fashion-MNIST. Writes OUT/comm_savings.{md,json,png} (OUT
defaults to benchmarks/out) and the run directories (configs, metrics.jsonl, rank logs) under
OUT/comm_savings_runs/. It refuses to start while any bb-* namespace exists: the names are global and
another benchmark (e.g. benchmarks/diloco.py) may be using them. `--quick` (ResNet width 8, blocks
[1, 1], 1 Gbit/s, 8 steps, all-reduce and PowerSGD rank 2; ~30 s) is the smoke test run by
tests/e2e/test_comm_savings_smoke.py.

Workload
--------
ResNet-18 (width 64, blocks [2,2,2,2]: 11,172,810 parameters, 44.7 MB of fp32 gradients) on
Fashion-MNIST average-pooled to 1x16x16 (loaded by `pooled_fashion_mnist` below, which the ranks import
as a custom data builder), 24 samples per rank (global batch 48), SGD lr 0.003 momentum 0.9, 40 steps
(1920 samples) per run. These CPUs compute about 100x slower than a GPU, so the input is shrunk until
one step's compute (0.30-0.35 s) is about what a plain all-reduce of the gradients adds at 1 Gbit/s
(0.32-0.33 s exposed), the regime of GPU clusters on 10-25 Gbit/s links: the all-reduce is 50-52% of
the uncompressed step at 1 Gbit/s and 92-93% at 100 Mbit/s; the report prints that share. (Until
2026-12-01 the default was 8x8 inputs and 8 per rank: all-reduce 97%/78% of the step, but a compute
step of 0.10-0.14 s, against which no PowerSGD overhead of ~0.08 s can stay under 25%.) PowerSGD (ours and torch's) compresses from step 3 (start_step 2).

Methods: all-reduce (method none), fp16, our PowerSGD rank 1, 2, 4 with DDP's default 25 MB buckets
(2 buckets for ResNet-18), our PowerSGD rank 2 with one bucket, and torch's PowerSGD hook rank 2 with
one bucket. torch's hook only works with one bucket on gloo: it issues its P and Q all-reduces from
future callbacks, which gloo runs on its own thread, so with several buckets the ranks can enqueue
collectives in different orders and gloo aborts ("op.preamble.length <= op.nbytes. 29184 vs 5504.
Received data size doesn't match expected size", seen at 1 Gbit/s). `bucket_cap_mb: 64` (> 44.7 MB)
gives one bucket, and our rank-2 row with the same layout compares the two like for like.

Columns
-------
- bytes/step: gradient payload handed to the collectives per step on one rank (sum of the gradient
  kinds' `comm_bytes/*` in metrics; for torch's hook these are counted by our wrapper from torch's own
  rule), and the analytic count from the parameter shapes: fp32 all-reduce 4 bytes per element, fp16
  half that, PowerSGD P (n x r) + Q (m x r) for each gradient viewed as n x m = shape[0] x rest that
  passes the compression test (n*m >= 2 (n+m) r for ours, strictly > for torch's), plain for the rest.
  "fewer x" is what a plain all-reduce would send over that.
- step s: median `step_time_s` of rank 0 over steps 6..40 (leaving out DDP's bucket rebuild,
  PowerSGD's plain steps and its first compressed step, which allocates residuals and draws Q); the
  mean is beside it. The median, because the machine is shared: within one run single steps of the
  same work take 0.29-0.49 s when other jobs burst, and the mean follows those bursts.
- compute s: the compute-only limit, the same per-rank work with no communication at all: both
  namespaces run a world-size-1 trainer with the per-rank batch at the same time (so both cores are as
  busy as in a real run). The slower of the two is the limit (a synchronous step waits for the slower
  rank). A compute-only run follows every method, so each method is compared with the mean of the
  two runs right before and after it: the machine's speed drifts by tens of percent over minutes
  (limits of 0.29 s and 0.40 s were measured in one invocation), and a limit measured minutes away
  made step/limit as noisy as that drift. The compute-only row is the mean of all of them. It has no
  DDP either, so DDP's own cost counts as exposed below.
- exposed s = step - compute: what communication and compression add to the critical path; the "comm"
  part of the stacked bars.
- comm_s (metrics): the sum of the gradient kinds' `comm_s/*` per step, which is NOT exposed time.
  For the async hooks (all-reduce, fp16) it is each bucket's all-reduce from issue (during backward)
  to completion: it overlaps backward, and since gloo runs the bucket all-reduces one after the other,
  the second bucket's time includes waiting for the first, so it can exceed the step (165% at
  100 Mbit/s). For our PowerSGD, P and Q are blocking all-reduces inside the hook (exposed, including
  waiting for the slower rank) and the uncompressed rest is async, overlapping the compression. For
  torch's hook it runs from calling the hook until its future completes, compression compute included.
  So step - comm_s is not the compute time; the split uses the measured compute-only limit instead.
- step/limit: step over compute (goal for PowerSGD rank 2: <= 1.25 at both rates).
- speed-up: all-reduce's step over this method's step, same rate.
- val acc / loss: accuracy on 2,000 Fashion-MNIST test images after the run and the mean training
  loss of the last 5 steps. 640 samples are far too few to compare convergence; these only show that
  nothing diverged (chance is 0.10), and differences between methods are within run-to-run noise.

Results of the previous version (an earlier session, load average 0.2-2.0; 8x8 inputs with
`--per-rank-batch 24`: 522 s, then `--per-rank-batch 40 --input-size 16`: 735 s)
-------
- Bytes: rank 2 sends 0.329 MB instead of 44.691 MB a step, 135.9x fewer, measured equal to analytic
  (rank 1 243.3x, rank 4 72.0x). Goal >= 100x: met.
- 8x8 inputs, 24 per rank (compute-only 0.104 s; the per-rank batch hardly moves it at this input
  size, 8 per rank measured 0.13 s in an earlier run): all-reduce is 97% (100 Mbit/s) and 78%
  (1 Gbit/s) of the uncompressed step. PowerSGD rank 2: 0.178 s and 0.175 s, 23.0x and 2.7x faster
  than all-reduce, 1.70x / 1.67x the compute-only limit: goal <= 1.25x NOT met.
- 16x16 inputs, 40 per rank (compute-only 0.35 s): PowerSGD rank 2 is 1.19x the limit at 100 Mbit/s
  (met) and 1.27x at 1 Gbit/s (1.25x with one bucket), 10.5x and 1.37x faster than all-reduce; but
  there DDP hides more of the all-reduce behind the longer backward and only 42% of the 1 Gbit/s
  uncompressed step is exposed communication (92% at 100 Mbit/s), under the "at least half" the
  workload asks for. On these CPUs the two conditions pull apart: our PowerSGD adds 0.065-0.094 s a
  step (compression on the rank's single core, memory-bound over 44.7 MB of gradients, plus the P/Q
  latency), and keeping that under 25% of compute needs a compute step >= 0.35 s, which at 1 Gbit/s
  (0.26-0.37 s of all-reduce) leaves the all-reduce under half of the step.
- Ours vs torch's hook, rank 2, both one bucket: 0.094 s vs 0.121 s over compute-only at 100 Mbit/s,
  0.086 s vs 0.110 s at 1 Gbit/s (16x16 run; 8x8 run: 0.083 vs 0.109 and 0.073 vs 0.098). Goal ours
  <= torch's: met.
- Since then: the residual is one fused addmm (M - P Q^T) instead of copy + subtract (reduce() on
  ResNet-18's gradients 35 -> 28 ms, `--profile`), and DDP keeps gradients as views into its buckets
  (no copy of 44.7 MB into the buckets and back each step, for every method).
- Re-measured 2026-12-01 with the new default workload (16x16, 24 per rank), two runs
  (`--methods "powersgd r2"`, then `--methods "powersgd r2" "powersgd r2 (1 bucket)"
  "torch_powersgd r2 (1 bucket)"`): all-reduce 92-93% / 50-52% of the uncompressed step at
  100 Mbit/s / 1 Gbit/s; PowerSGD rank 2 steps 0.425-0.432 s and 0.411-0.458 s against compute-only
  limits of 0.349 / 0.311 s (first run) and 0.308 / 0.300 s (second): 1.24x / 1.32x, then 1.38x /
  1.53x. Goal <= 1.25x: met once at 100 Mbit/s, not at 1 Gbit/s. The step time repeats within 8%;
  the compute-only limit moved 0.29-0.40 s between its before and after runs, so the ratio is as
  noisy as that denominator. Ours over torch's hook (both one bucket): 0.119 vs 0.173 s at
  100 Mbit/s, 0.158 vs 0.224 s at 1 Gbit/s (met).
- Re-measured 2026-12-02 with each method between two compute-only runs and medians
  (`--methods "powersgd r2" "powersgd r2 (1 bucket)" "torch_powersgd r2 (1 bucket)"`, 633 s, load
  0.2-2.3; compute-only runs 0.275-0.348 s): all-reduce 92% / 50% of the uncompressed step at
  100 Mbit/s / 1 Gbit/s. PowerSGD rank 2: 0.396 s / 0.443 s, 1.35x / 1.34x its limit, 10.6x / 1.35x
  faster than all-reduce; one bucket 1.35x / 1.24x; torch's hook (one bucket) 1.78x / 1.44x. Goal
  <= 1.25x: not met with DDP's default buckets (met once with one bucket at 1 Gbit/s).
  Ours over torch's hook (one bucket each): 0.103 vs 0.247 s at 100 Mbit/s, 0.079 vs 0.132 s at
  1 Gbit/s (met).
- Where the rest of the step goes (2026-12-02, 1 Gbit/s, one run each with timers patched into a
  local copy of the trainer): DDP with a comm hook that returns at once (no gradient traffic at all)
  already takes 1.14x the compute-only step (0.284 vs 0.249 s): backward +10 ms (DDP copies each
  freshly allocated gradient into its bucket), forward +5 ms, optimizer +4 ms, the loss all-reduce
  2-4 ms, plus waiting for the slower rank at every synchronisation. Our compression then adds its
  memory-bound compute, +0.034 s a step on one core (`--profile`: eight passes over 44.7 MB of
  gradients: error add 3, P 1, Q 1, residual 2, approximation 1), and the two hooks take 8 ms and
  47-63 ms inside backward (compression plus P/Q waits). 1.14x + 0.034/0.31 is already ~1.25x
  before any wait on P or Q, so on these two cores the goal sits at the floor of this design.
- Tried and not kept (2026-12-02): an asynchronous hook that issues each bucket's P all-reduce and
  returns, moves earlier buckets on by one stage at every later bucket (from the backward thread, in
  bucket order, so ranks stay in step) and finishes all at the last bucket. Three interleaved A/B
  rounds each (median step s, old vs staged): 1 Gbit/s 0.470/0.460/0.446 vs 0.462/0.476/0.360,
  100 Mbit/s 0.394/0.427/0.450 vs 0.439/0.425/0.453: no difference beyond the noise, since the P/Q
  transfers are a few ms and the compression compute cannot overlap backward on a rank's one core.
  On GPUs the blocking all-reduces only enqueue on the stream, so the host does not wait there either.
- fp16 halves the bytes: 1.9x faster at 100 Mbit/s, 1.1-1.6x at 1 Gbit/s (gloo sums fp16 on the CPU).
- torch's hook with DDP's default two buckets crashes on gloo (see Methods above).
- val accuracy after 640 (8x8) or 3200 (16x16) samples is only a check that nothing diverged (chance
  0.10); runs are deterministic on CPU, so both rates give the same numbers per method.

`--profile` measures the compression compute alone in one process with one thread: forward+backward
of DDP (world size 1, one bucket) with each hook, and torch.profiler's op table of our
`PowerSGD.reduce` on ResNet-18's gradients.

Caveats: the machine's two cores are shared with other jobs, so step times move by tens of percent
from run to run (the compute-only step was 0.35-0.44 s under a load average of 5-11 and 0.14 s on an
idle machine); the load average is printed and recorded per run in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
from benchmarks.netns_ranks import (NETNS_RUN, cluster, emulated_network, interruptible,  # noqa: E402
                                    netns_problem, run_processes)

OUT = Path(__file__).resolve().parent / "out"
MASTER_ADDR, MASTER_PORT = "10.77.0.1", 29500
FP32_BYTES = 4
POWERSGD_RATE = 2.0  # min_compression_rate, ours and torch's
START_STEP = 2  # PowerSGD's plain all-reduce steps (torch needs >= 2)
ONE_BUCKET_MB = 64.0  # > 44.7 MB of ResNet-18 gradients: DDP makes a single bucket
LOSS_TAIL = 5  # final loss: mean over this many last steps


@dataclass(frozen=True)
class Method:
    """One table row: a label, the config's `compression` section and the DDP bucket size."""

    label: str
    compression: dict
    bucket_cap_mb: float = 25.0  # DDP's default

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


def powersgd(rank: int, torch_hook: bool = False, one_bucket: bool = False) -> Method:
    method = "torch_powersgd" if torch_hook else "powersgd"
    return Method(f"{method} r{rank}" + (" (1 bucket)" if one_bucket else ""),
                  {"method": method, "rank": rank, "start_step": START_STEP,
                   "min_compression_rate": POWERSGD_RATE},
                  bucket_cap_mb=ONE_BUCKET_MB if one_bucket else 25.0)


# Timed through bigbatch's hook (~2 ms on steps of seconds) so its comm_s share can be reported.
ALL_REDUCE = Method("all-reduce", {"method": "none", "time_collectives": True})
# torch's hook issues its P and Q all-reduces from future callbacks, which gloo runs on its own thread:
# with several buckets the ranks can enqueue collectives in different orders and gloo aborts ("Received
# data size doesn't match expected size"). One bucket avoids that; ours runs both ways to compare alike.
TORCH_R2 = powersgd(2, torch_hook=True, one_bucket=True)
OURS_R2_ONE_BUCKET = powersgd(2, one_bucket=True)
FULL_METHODS = (ALL_REDUCE, Method("fp16", {"method": "fp16"}), powersgd(1), powersgd(2), powersgd(4),
                OURS_R2_ONE_BUCKET, TORCH_R2)
QUICK_METHODS = (ALL_REDUCE, powersgd(2))


@dataclass(frozen=True)
class Setup:
    """The workload: model, input, per-rank batch, budget, and how the runs are measured."""

    width: int = 64
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    input_size: int = 16  # Fashion-MNIST pooled to input_size x input_size
    per_rank_batch: int = 24
    steps: int = 40
    warmup: int = 5  # leading steps left out of the step-time medians and means
    world: int = 2
    bracket: bool = True  # a compute-only run after every method, so each has one right before and after
    run_timeout_s: float = 900.0

    @property
    def global_batch(self) -> int:
        return self.per_rank_batch * self.world


FULL = Setup()
QUICK = Setup(width=8, blocks=(1, 1), input_size=8, per_rank_batch=8, steps=8, warmup=4, bracket=False, run_timeout_s=120.0)


# --------------------------------------------------------------------------- data, configs, analytic bytes

def pooled_fashion_mnist(cfg: Any) -> Any:
    """Fashion-MNIST average-pooled to `data.kwargs.size` pixels a side (the ranks import this as
    `data.name: benchmarks.comm_savings:pooled_fashion_mnist`)."""
    import torch.nn.functional as F

    from bigbatch.data.rules import DEFAULT_FASHION_MNIST
    from bigbatch.data.base import DataBundle, TensorSplit
    from bigbatch.data.fashion_mnist import load_fashion_mnist

    size = int(cfg.kwargs.get("size", 8))
    full = load_fashion_mnist(cfg.path or DEFAULT_FASHION_MNIST)
    pooled = [TensorSplit(F.adaptive_avg_pool2d(split.inputs, size), split.targets)
              for split in (full.train, full.val)]
    return DataBundle(pooled[0], pooled[1], "classify", (1, size, size), full.num_classes)


def bench_config(setup: Setup, runs_dir: Path, name: str, method: Method, global_batch: int) -> dict:
    """The trainer config of one run (same data, model, optimizer and step count for every run)."""
    return {
        "run": {"name": name, "out_dir": str(runs_dir), "seed": 0, "deterministic": False,
                "max_samples": setup.steps * global_batch},
        "data": {"name": "benchmarks.comm_savings:pooled_fashion_mnist",
                 "kwargs": {"size": setup.input_size}},
        "model": {"name": "resnet", "width": setup.width, "blocks": list(setup.blocks)},
        "optim": {"name": "sgd", "lr": 0.003, "momentum": 0.9},
        "batch": {"global_batch": global_batch},
        "distributed": {"timeout_s": 120.0, "bucket_cap_mb": method.bucket_cap_mb},
        "compression": method.compression,
        "checkpoint": {"at_end": False, "resume": "never"},
        "eval": {"at_end": True, "batch_size": 500, "max_batches": 2},
        "metrics": {"tensorboard": False, "progress": "log", "log_every_steps": 10},
    }


def param_shapes(setup: Setup) -> list[tuple[int, ...]]:
    """Parameter shapes of the benchmark model, as the trainer builds it."""
    from bigbatch.models.resnet import ResNet

    model = ResNet((1, setup.input_size, setup.input_size), 10, setup.width, list(setup.blocks))
    return [tuple(p.shape) for p in model.parameters()]


def analytic_bytes(shapes: Sequence[tuple[int, ...]], compression: dict) -> int:
    """Gradient bytes one rank hands to the collectives per step once compression is on."""
    numels = [math.prod(shape) for shape in shapes]
    method = compression["method"]
    if method == "none":
        return FP32_BYTES * sum(numels)
    if method in ("fp16", "bf16"):
        return FP32_BYTES * sum(numels) // 2
    rank, rate = compression["rank"], compression["min_compression_rate"]
    strict = method == "torch_powersgd"  # torch compresses iff (n+m) r rate < n m; ours iff <=
    elements = 0
    for shape, numel in zip(shapes, numels):
        n = shape[0] if shape else 1
        m = numel // n
        r = min(n, m, rank)
        worth = n * m > rate * (n + m) * r if strict else n * m >= rate * (n + m) * r
        elements += (n + m) * r if len(shape) >= 2 and worth else numel
    return FP32_BYTES * elements


# --------------------------------------------------------------------------- running ranks

def rank_command(node: int, config: Path, env: dict[str, str]) -> list[str]:
    """`netns-run.sh NODE env K=V... python -m bigbatch train CONFIG`."""
    assignments = [f"{k}={v}" for k, v in env.items()]
    return [str(NETNS_RUN), str(node), "env", *assignments, sys.executable, "-m", "bigbatch", "train",
            str(config)]


def ddp_env(rank: int, world: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": MASTER_ADDR, "MASTER_PORT": str(MASTER_PORT), "GLOO_SOCKET_IFNAME": "veth0",
            "OMP_NUM_THREADS": "1"}


def fresh_run(runs_dir: Path, name: str, raw: dict) -> Path:
    """Write the config of run `name` (after removing an earlier run of that name); its path."""
    run_dir = runs_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl is appended to, so start empty
    run_dir.mkdir(parents=True)
    config = runs_dir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def run_method(setup: Setup, method: Method, runs_dir: Path) -> dict:
    """One 2-rank run with `method`; its summary."""
    name = method.slug
    raw = bench_config(setup, runs_dir, name, method, setup.global_batch)
    config = fresh_run(runs_dir, name, raw)
    commands = [rank_command(rank, config, ddp_env(rank, setup.world)) for rank in range(setup.world)]
    logs = [runs_dir / name / f"rank{rank}.log" for rank in range(setup.world)]
    load = os.getloadavg()[0]
    run_processes(commands, logs, setup.run_timeout_s)
    return {**summarise_run(runs_dir / name, setup.warmup), "load_before": load,
            "load_after": os.getloadavg()[0]}


def run_compute_only(setup: Setup, runs_dir: Path, tag: str) -> dict:
    """The per-rank work with no communication: one world-size-1 trainer per namespace, together."""
    names = [f"compute-only-{tag}-node{node}" for node in range(setup.world)]
    commands, logs = [], []
    for node, name in enumerate(names):
        raw = bench_config(setup, runs_dir, name, ALL_REDUCE, setup.per_rank_batch)
        commands.append(rank_command(node, fresh_run(runs_dir, name, raw), {"OMP_NUM_THREADS": "1"}))
        logs.append(runs_dir / name / "rank0.log")
    load = os.getloadavg()[0]
    run_processes(commands, logs, setup.run_timeout_s)
    per_node = [summarise_run(runs_dir / name, setup.warmup) for name in names]
    return {"tag": tag, "per_node_median_s": [s["step_s_median"] for s in per_node],
            "step_s": max(s["step_s"] for s in per_node),
            "step_s_median": max(s["step_s_median"] for s in per_node), "load_before": load,
            "load_after": os.getloadavg()[0]}


# --------------------------------------------------------------------------- reading the metrics

def summarise_run(run_dir: Path, warmup: int) -> dict:
    """Means over the steps after `warmup` from rank 0's metrics.jsonl."""
    from bigbatch.distributed.ddp import GRADIENT_KINDS
    from bigbatch.metrics import METRICS_FILE, read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in rows if r.get("kind", "train") == "train"]
    timed = train[warmup:]
    if not timed:
        raise RuntimeError(f"{run_dir}: {len(train)} steps logged, none after the {warmup} warm-up steps")
    evals = [r for r in rows if r.get("kind") == "eval"]

    def mean(key: str) -> float:
        return statistics.fmean(r.get(key, 0.0) for r in timed)

    comm_s = {k: mean(f"comm_s/{k}") for k in GRADIENT_KINDS if any(f"comm_s/{k}" in r for r in timed)}
    return {
        "steps": len(train), "timed_steps": len(timed),
        "step_s": mean("step_time_s"),
        "step_s_median": statistics.median(r["step_time_s"] for r in timed),
        "bytes": sum(mean(f"comm_bytes/{k}") for k in GRADIENT_KINDS),
        "bytes_uncompressed": mean("comm_bytes/uncompressed"),
        "comm_s_by_kind": comm_s, "comm_s": sum(comm_s.values()),
        "loss": statistics.fmean(r["loss"] for r in train[-LOSS_TAIL:]),
        "val_accuracy": evals[-1]["val_accuracy"] if evals else math.nan,
    }


# --------------------------------------------------------------------------- the benchmark

def run_rate(setup: Setup, methods: Sequence[Method], rate: str, runs_root: Path) -> dict:
    """Bring the cluster up at `rate`; one run per method, each between two compute-only runs
    (with `setup.bracket`; else all after one), and each compared with the limit measured beside it."""
    cluster("up", str(setup.world), rate)
    runs_dir = runs_root / rate
    limits, results = [measure_limit(setup, runs_dir, rate, "0")], {}
    for position, method in enumerate(methods, start=1):
        print(f"[{rate}] {method.label}", flush=True)
        started = time.perf_counter()
        run = results[method.label] = run_method(setup, method, runs_dir)
        print(f"    step {run['step_s_median']:.3f} s median  ({time.perf_counter() - started:.0f} s wall)",
              flush=True)
        if setup.bracket:
            limits.append(measure_limit(setup, runs_dir, rate, str(position)))
        beside = limits[-2:] if setup.bracket else limits[:1]
        run["limit_tags"] = [limit["tag"] for limit in beside]
        run["limit_s"] = statistics.fmean(limit["step_s_median"] for limit in beside)
    return {"rate": rate, "limit_s": statistics.fmean(limit["step_s_median"] for limit in limits),
            "limit_runs": limits, "methods": results}


def measure_limit(setup: Setup, runs_dir: Path, rate: str, tag: str) -> dict:
    print(f"[{rate}] compute-only ({tag})", flush=True)
    limit = run_compute_only(setup, runs_dir, tag)
    print(f"    step {limit['step_s_median']:.3f} s median", flush=True)
    return limit


def table_rows(setup: Setup, methods: Sequence[Method], blocks: Sequence[dict]) -> list[dict]:
    """One row per (rate, method) plus a compute-only row per rate, with every derived column."""
    shapes = param_shapes(setup)
    dense = analytic_bytes(shapes, ALL_REDUCE.compression)
    rows = []
    for block in blocks:
        runs = block["methods"]
        reference = runs[ALL_REDUCE.label]["step_s_median"] if ALL_REDUCE.label in runs else math.nan
        limit = block["limit_s"]
        rows.append({"method": "compute-only", "rate": block["rate"], "step_s": limit,
                     "step_mean_s": statistics.fmean(run["step_s"] for run in block["limit_runs"]),
                     "compute_s": limit, "exposed_s": 0.0, "step_over_limit": 1.0,
                     "speedup": reference / limit})
        for method in methods:
            run = runs[method.label]
            analytic = analytic_bytes(shapes, method.compression)
            step, beside = run["step_s_median"], run["limit_s"]  # the compute-only runs around it
            rows.append({
                "method": method.label, "rate": block["rate"], "bytes": run["bytes"],
                "bytes_analytic": analytic, "fewer": run["bytes_uncompressed"] / run["bytes"],
                "fewer_analytic": dense / analytic, "step_s": step, "step_mean_s": run["step_s"],
                "compute_s": beside, "limit_tags": run["limit_tags"],
                "exposed_s": step - beside, "comm_s": run["comm_s"],
                "step_over_limit": step / beside, "speedup": reference / step,
                "val_accuracy": run["val_accuracy"], "loss": run["loss"]})
    return rows


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _num(value: Any, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of `table_rows`."""
    header = ["method", "rate", "bytes/step (measured)", "bytes/step (analytic)", "fewer x (meas/anal)",
              "step s (median)", "mean", "compute s", "exposed comm s", "comm_s metrics", "step/limit", "speed-up",
              "val acc", "loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        fewer = (f"{r['fewer']:.1f} / {r['fewer_analytic']:.1f}" if "fewer" in r else "")
        cells = [r["method"], r["rate"], _mb(r["bytes"]) if "bytes" in r else "0",
                 _mb(r["bytes_analytic"]) if "bytes_analytic" in r else "0", fewer,
                 _num(r["step_s"], ".3f"), _num(r["step_mean_s"], ".3f"), _num(r["compute_s"], ".3f"),
                 _num(r["exposed_s"], ".3f"),
                 _num(r.get("comm_s"), ".3f"), _num(r["step_over_limit"], ".2f"),
                 _num(r["speedup"], ".2f") + "x" if not math.isnan(r["speedup"]) else "",
                 _num(r.get("val_accuracy"), ".3f"), _num(r.get("loss"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find(rows: Sequence[dict], method: str, rate: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["rate"] == rate), None)


def goal_lines(rows: Sequence[dict], rates: Sequence[str]) -> list[str]:
    """The all-reduce share of the step, and each goal with what was measured (met or not)."""
    lines = []
    for rate in rates:
        plain = find(rows, ALL_REDUCE.label, rate)
        if plain:
            lines.append(f"all-reduce share of the uncompressed step at {rate}: "
                         f"{plain['exposed_s'] / plain['step_s']:.0%} exposed (step - compute-only); "
                         f"comm_s in metrics is {plain['comm_s'] / plain['step_s']:.0%} of the step")
    r2 = [r for r in rows if r["method"] in ("powersgd r2", OURS_R2_ONE_BUCKET.label)]
    for r in r2[:1]:
        met = "met" if min(r["fewer"], r["fewer_analytic"]) >= 100 else "NOT met"
        lines.append(f"goal >= 100x fewer bytes at rank 2: measured {r['fewer']:.1f}x, "
                     f"analytic {r['fewer_analytic']:.1f}x -> {met}")
    for r in r2:
        met = "met" if r["step_over_limit"] <= 1.25 else "NOT met"
        lines.append(f"goal {r['method']} step <= 1.25x compute-only at {r['rate']}: "
                     f"{r['step_over_limit']:.2f}x -> {met}")
    for rate in rates:
        ours, theirs = find(rows, OURS_R2_ONE_BUCKET.label, rate), find(rows, TORCH_R2.label, rate)
        if ours and theirs:
            met = "met" if ours["exposed_s"] <= theirs["exposed_s"] else "NOT met"
            lines.append(f"goal our PowerSGD r2 overhead <= torch's hook (both 1 bucket) at {rate}: ours "
                         f"{ours['exposed_s']:.3f} s, torch {theirs['exposed_s']:.3f} s over compute-only "
                         f"-> {met}")
    return lines


def plot(rows: Sequence[dict], rates: Sequence[str], path: Path) -> None:
    """Step-time bars per method, one panel per rate: compute-only limit + exposed communication."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.8), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        block = [r for r in rows if r["rate"] == rate]
        x = range(len(block))
        compute = [r["compute_s"] for r in block]
        exposed = [max(r["exposed_s"], 0.0) for r in block]
        ax.bar(x, compute, color="tab:blue", label="compute (compute-only limit)")
        ax.bar(x, exposed, bottom=compute, color="tab:orange", label="exposed comm + compression")
        ax.plot(x, [r.get("comm_s", math.nan) for r in block], "k_", markersize=18,
                label="comm_s in metrics (in flight)")
        ax.axhline(1.25 * block[0]["compute_s"], color="grey", ls=":", label="1.25 x compute-only")
        for i, r in enumerate(block):
            ax.annotate(f"{r['step_s']:.2f}s\n{r['speedup']:.1f}x", (i, r["step_s"]), ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(list(x), [r["method"] for r in block], rotation=30, ha="right")
        ax.set_ylabel("seconds per step")
        ax.set_title(f"2 ranks at {rate} (labels: step time, speed-up vs all-reduce)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(setup: Setup, methods: Sequence[Method], blocks: list[dict], rates: Sequence[str],
                 out: Path, command: str) -> str:
    """Table, goals, PNG and raw results under `out`; returns the text printed."""
    rows = table_rows(setup, methods, blocks)
    limits = "; ".join(f"{b['rate']}: " + ", ".join(
        f"{run['tag']} {run['step_s_median']:.3f} s (nodes {', '.join(f'{s:.3f}' for s in run['per_node_median_s'])})"
        for run in b["limit_runs"]) for b in blocks)
    loads = [v for b in blocks for run in [*b["limit_runs"], *b["methods"].values()]
             for v in (run["load_before"], run["load_after"])]
    text = "\n".join([
        f"command: {command}",
        f"model: resnet width {setup.width} blocks {list(setup.blocks)} "
        f"({sum(math.prod(s) for s in param_shapes(setup)):,} parameters), Fashion-MNIST pooled to "
        f"1x{setup.input_size}x{setup.input_size}, "
        f"{setup.world} ranks x {setup.per_rank_batch} samples, {setup.steps} steps, "
        f"step times: median over steps {setup.warmup + 1}..{setup.steps} of rank 0 (compute-only: "
        f"the slower node); each method's compute s is the mean of the compute-only runs "
        f"{'right before and after it' if setup.bracket else 'before the methods'}",
        "", format_table(rows), "",
        f"compute-only runs: {limits}",
        f"1-minute load average during the runs: {min(loads):.1f} .. {max(loads):.1f} (2 cores)", "",
        *goal_lines(rows, rates)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_savings.md").write_text(text + "\n")
    (out / "comm_savings.json").write_text(json.dumps(
        {"setup": {**setup.__dict__}, "rows": rows, "blocks": blocks}, indent=1, default=str))
    plot(rows, rates, out / "comm_savings.png")
    return text


# --------------------------------------------------------------------------- compression compute, no network

def wrap_with_hook(model: Any, method: Method | None) -> Any:
    """`model` in DDP (one bucket) with `method`'s comm hook; the bare model for None."""
    from torch.nn.parallel import DistributedDataParallel

    from bigbatch.compression.ddp_hook import param_names_by_id, register_compression_hook
    from bigbatch.compression.factory import build_compressor
    from bigbatch.compression.torch_powersgd import register_torch_powersgd
    from bigbatch.comm import Communicator

    if method is None:
        return model
    ddp = DistributedDataParallel(model, bucket_cap_mb=ONE_BUCKET_MB, gradient_as_bucket_view=True)  # as DDPStrategy
    comm = Communicator()
    settings = {k: v for k, v in method.compression.items() if k not in ("method", "time_collectives")}
    if method.compression["method"] == "torch_powersgd":
        register_torch_powersgd(ddp, comm=comm, **settings)
    else:
        compressor = build_compressor(method.compression["method"], **settings)
        register_compression_hook(ddp, compressor, comm, param_names_by_id(model))
    return ddp


def hook_step_seconds(setup: Setup, method: Method | None, steps: int) -> float:
    """Median forward+backward seconds with `method`'s hook on DDP of world size 1: the hook's
    compute with no transfer (None: the bare model, no DDP). Needs a one-process group."""
    import torch

    from bigbatch.models.resnet import ResNet

    torch.manual_seed(0)
    side, batch = setup.input_size, setup.per_rank_batch
    model = wrap_with_hook(ResNet((1, side, side), 10, setup.width, list(setup.blocks)), method)
    x, y = torch.randn(batch, 1, side, side), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(START_STEP + 2 + steps):  # the first steps are plain all-reduce and warm-up
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[START_STEP + 2:])


def powersgd_op_table(setup: Setup, rank: int, calls: int) -> str:
    """torch.profiler's self-CPU table of our PowerSGD.reduce on the model's gradient shapes."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from bigbatch.compression.powersgd import PowerSGD
    from bigbatch.comm import Communicator

    grads = [(f"p{i}", torch.randn(shape)) for i, shape in enumerate(param_shapes(setup))]
    compressor, comm = PowerSGD(rank=rank, start_step=0), Communicator()
    compressor.reduce(grads, comm)  # allocates residuals, draws Q
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function("PowerSGD.reduce"):
                compressor.reduce(grads, comm)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


def profile_compression(setup: Setup, steps: int = 12) -> str:
    """Compression compute in one process, one thread: per-step cost of each hook, and our op table."""
    import tempfile

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            methods = (None, ALL_REDUCE, OURS_R2_ONE_BUCKET, TORCH_R2)
            seconds = {m.label if m else "no DDP": hook_step_seconds(setup, m, steps) for m in methods}
        finally:
            dist.destroy_process_group()
    base = seconds[ALL_REDUCE.label]
    lines = [f"forward+backward+hook, 1 process, 1 thread, median of {steps} steps (no transfer):"]
    lines += [f"  {label:<30} {s:.3f} s  ({s - base:+.3f} s vs all-reduce's hook)"
              for label, s in seconds.items()]
    return "\n".join(lines + ["", f"our PowerSGD rank 2, reduce() on all {len(param_shapes(setup))} "
                               "gradients, 5 calls:", powersgd_op_table(setup, 2, 5)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for comm_savings.{md,json,png}")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1gbit, 8 steps, 2 methods")
    parser.add_argument("--profile", action="store_true",
                        help="no network: time each PowerSGD hook's compute in one process and "
                             "profile ours (no root needed)")
    parser.add_argument("--rates", nargs="+", default=None, help="tc rates (default 100mbit 1gbit)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (fixed sample budget)")
    parser.add_argument("--per-rank-batch", type=int, default=None)
    parser.add_argument("--input-size", type=int, default=None,
                        help="Fashion-MNIST pooled to this many pixels a side (default 16)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"labels to run (default all: {', '.join(m.label for m in FULL_METHODS)})")
    args = parser.parse_args(argv)
    known = {m.label: m for m in FULL_METHODS}
    unknown = [label for label in args.methods or () if label not in known]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(known)}")
    return args


def choose(args: argparse.Namespace) -> tuple[Setup, list[Method], list[str]]:
    setup = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("steps", args.steps), ("per_rank_batch", args.per_rank_batch),
                                 ("input_size", args.input_size)) if v is not None}
    setup = Setup(**{**setup.__dict__, **changes})
    if setup.steps <= setup.warmup:
        raise ValueError(f"--steps must exceed the {setup.warmup} warm-up steps, got {setup.steps}")
    if setup.per_rank_batch < 1:
        raise ValueError(f"--per-rank-batch must be >= 1, got {setup.per_rank_batch}")
    by_label = {m.label: m for m in FULL_METHODS}
    methods = ([by_label[label] for label in args.methods] if args.methods
               else list(QUICK_METHODS if args.quick else FULL_METHODS))
    if ALL_REDUCE not in methods:
        methods.insert(0, ALL_REDUCE)  # the speed-up reference
    rates = args.rates or (["1gbit"] if args.quick else ["100mbit", "1gbit"])
    return setup, methods, rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup, methods, rates = choose(args)
    if args.profile:
        print(profile_compression(setup))
        return 0
    problem = netns_problem()
    if problem:
        print(f"comm_savings: cannot run: {problem}", file=sys.stderr)
        return 2
    interruptible()
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)
    started = time.perf_counter()
    try:
        with emulated_network():
            blocks = [run_rate(setup, methods, rate, args.out / "comm_savings_runs") for rate in rates]
    except KeyboardInterrupt:
        print("comm_savings: interrupted; ranks killed, namespaces removed", file=sys.stderr)
        return 130
    print(write_report(setup, methods, blocks, rates, args.out, command))
    print(f"total {time.perf_counter() - started:.0f} s; wrote {args.out / 'comm_savings.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
