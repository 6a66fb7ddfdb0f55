"""bigbatch's DDP training step vs a minimal hand-written torch DDP loop: same model, data, 2 ranks.

Segments of `--steps` optimizer steps alternate between the two loops (pairs interleaved, so drift in
machine load hits both alike; which loop goes first alternates too). Every step is timed (bigbatch's
own `step_time_s` rows, the hand loop around its body); the table shows each loop's median step
time, the samples/s it implies and their ratio. Medians, because on a shared 2-core machine single
steps stall for tens of ms and a mean or a segment total follows those stalls, not the loops.

    python benchmarks/trainer_overhead.py [--ranks 2] [--pairs 60] [--steps 10] [--quick]

Results (2026-12-01, MLP 784-1024-1024-10 on Fashion-MNIST, global batch 256, 2 gloo ranks):
- before: 0.909-0.939 (three runs). Variants of bigbatch's step, one run each: without its comm hook
  0.968; with torch's own Python `allreduce_hook` instead of ours 0.937; with DDP's C++ built-in
  all-reduce 0.968; without the gradient norm 0.933 (inside the noise). Any Python comm hook costs
  ~2 ms of a ~34 ms step, so `compression.method: none` now leaves averaging to DDP's C++ path.
- after that and with gradients as views into DDP's buckets (the hand loop keeps DDP's default, which
  copies every gradient into its bucket and back): 0.974, 1.004, 1.006.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from bigbatch.training.build import build_trainer
from bigbatch.validate import validate_config
from bigbatch.launch.runtime import Runtime
from bigbatch.models.registry import build_model
from bigbatch.testing import run_ranks

OUT = Path(__file__).parent / "out"


def bench_config(out_dir: str, data: dict, global_batch: int) -> dict:
    return {"run": {"name": "overhead", "out_dir": out_dir, "max_steps": 10**6, "deterministic": False},
            "data": data, "model": {"name": "mlp", "hidden": [1024, 1024]},
            "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "batch": {"global_batch": global_batch}, "eval": {"at_end": False},
            "checkpoint": {"at_end": False},
            "metrics": {"tensorboard": False, "progress": "none"}}


def hand_written_loop(model, data, batch_per_rank: int, rank: int, world: int, steps: int, start: int,
                      step_times: list[float]) -> int:
    """The minimal DDP loop a user would write: index, forward, backward, step."""
    optimizer = hand_written_loop.optimizer
    for step in range(start, start + steps):
        began = time.perf_counter()
        offset = (step * batch_per_rank * world + rank * batch_per_rank) % (len(data) - batch_per_rank)
        idx = torch.arange(offset, offset + batch_per_rank)
        x, y = data.batch(idx)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach()
        dist.all_reduce(reported)  # the hand loop also reports a global loss, like bigbatch does
        step_times.append(time.perf_counter() - began)
    return start + steps


def rank_main(rank: int, world: int, raw: dict, pairs: int, steps: int) -> dict:
    """Per-step seconds of each loop over the timed segments (bigbatch's from its metrics.jsonl)."""
    cfg = validate_config(raw)
    trainer = build_trainer(cfg, Runtime(rank, world, rank, torch.device("cpu"), "gloo"))
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(cfg.model, trainer.data))
    hand_written_loop.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    per_rank = cfg.batch.global_batch // world
    hand_times, hand_step, warmup = [], 0, 5
    trainer.max_steps = warmup
    trainer.fit()
    hand_step = hand_written_loop(model, trainer.data.train, per_rank, rank, world, warmup, hand_step, [])
    for pair in range(pairs):
        # Alternate which loop runs first, so an order effect (a GC pause, a cache left warm by the
        # other loop) cannot favour one side.
        order = ("bigbatch", "hand") if pair % 2 == 0 else ("hand", "bigbatch")
        for name in order:
            dist.barrier()
            if name == "bigbatch":
                trainer.max_steps += steps
                trainer.fit()
            else:
                hand_step = hand_written_loop(model, trainer.data.train, per_rank, rank, world, steps,
                                              hand_step, hand_times)
    trainer.metrics.close()
    rows = [json.loads(line) for line in trainer.metrics.path.read_text().splitlines()] if rank == 0 else []
    ours = [row["step_time_s"] for row in rows if row.get("step", 0) > warmup and "step_time_s" in row]
    return {"bigbatch": ours, "hand": hand_times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="synthetic data, few steps (smoke test)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    data = {"name": "fashion_mnist"}
    if args.quick:
        args.pairs, args.steps = 2, 5
        data = {"name": "synthetic", "shape": [1, 28, 28], "num_samples": 2048}
    with tempfile.TemporaryDirectory() as tmp:
        raw = bench_config(tmp, data, args.global_batch)
        results = run_ranks(rank_main, args.ranks, raw, args.pairs, args.steps, timeout_s=1800)
    ours, hand = results[0]["bigbatch"], results[0]["hand"]
    # Median step time: robust to the scheduler stalls a shared 2-core machine throws at single steps.
    rates = {name: args.global_batch / statistics.median(times) for name, times in
             (("bigbatch", ours), ("hand DDP", hand))}
    print(f"{'loop':<12}{'steps':>7}{'median step ms':>16}{'samples/s':>11}")
    for name, times in (("bigbatch", ours), ("hand DDP", hand)):
        print(f"{name:<12}{len(times):>7}{1000 * statistics.median(times):>16.2f}{rates[name]:>11.0f}")
    print(f"ratio bigbatch / hand (samples/s at the median step time): {rates['bigbatch'] / rates['hand DDP']:.3f}")
    plot(ours, hand, args.out / "trainer_overhead.png")
    return 0


def plot(ours: list[float], hand: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ms = [1000 * t for t in ours + hand]
    bins = [min(ms) + i * (sorted(ms)[int(0.98 * len(ms))] - min(ms)) / 40 for i in range(41)]
    ax.hist([1000 * t for t in ours], bins=bins, alpha=0.6, label="bigbatch")
    ax.hist([1000 * t for t in hand], bins=bins, alpha=0.6, label="hand-written DDP")
    ax.set_xlabel("step time (ms; slowest 2% not shown)")
    ax.set_ylabel("steps")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
