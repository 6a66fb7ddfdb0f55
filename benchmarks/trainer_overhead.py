"""bigbatch's DDP training step vs a minimal hand-written torch DDP loop: same model, data, 2 ranks.

Segments of `--steps` optimizer steps alternate between the two loops (pairs interleaved, so drift in
machine load hits both alike); the table shows the median samples/s of each and their ratio.

    python benchmarks/trainer_overhead.py [--ranks 2] [--pairs 7] [--steps 40] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from bigbatch.build import build_trainer
from bigbatch.config import validate_config
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


def hand_written_loop(model, data, batch_per_rank: int, rank: int, world: int, steps: int, start: int):
    """The minimal DDP loop a user would write: index, forward, backward, step."""
    optimizer = hand_written_loop.optimizer
    for step in range(start, start + steps):
        offset = (step * batch_per_rank * world + rank * batch_per_rank) % (len(data) - batch_per_rank)
        idx = torch.arange(offset, offset + batch_per_rank)
        x, y = data.batch(idx)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach()
        dist.all_reduce(reported)  # the hand loop also reports a global loss, like bigbatch does
    return start + steps


def rank_main(rank: int, world: int, raw: dict, pairs: int, steps: int) -> dict:
    cfg = validate_config(raw)
    trainer = build_trainer(cfg, Runtime(rank, world, rank, torch.device("cpu"), "gloo"))
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(cfg.model, trainer.data))
    hand_written_loop.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    per_rank = cfg.batch.global_batch // world
    ours, theirs, hand_step = [], [], 0
    trainer.max_steps = 5  # warm-up both
    trainer.fit()
    hand_step = hand_written_loop(model, trainer.data.train, per_rank, rank, world, 5, hand_step)
    for _ in range(pairs):
        dist.barrier()
        t0 = time.perf_counter()
        trainer.max_steps += steps
        trainer.fit()
        dist.barrier()
        t1 = time.perf_counter()
        hand_step = hand_written_loop(model, trainer.data.train, per_rank, rank, world, steps, hand_step)
        dist.barrier()
        t2 = time.perf_counter()
        ours.append(steps * cfg.batch.global_batch / (t1 - t0))
        theirs.append(steps * cfg.batch.global_batch / (t2 - t1))
    trainer.metrics.close()
    return {"bigbatch": ours, "hand": theirs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
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
    ratio = statistics.median(o / h for o, h in zip(ours, hand))
    print(f"{'loop':<12}{'median samples/s':>18}{'min':>10}{'max':>10}")
    for name, values in (("bigbatch", ours), ("hand DDP", hand)):
        print(f"{name:<12}{statistics.median(values):>18.0f}{min(values):>10.0f}{max(values):>10.0f}")
    print(f"ratio bigbatch / hand (median of {len(ours)} interleaved pairs): {ratio:.3f}")
    plot(ours, hand, args.out / "trainer_overhead.png")
    return 0


def plot(ours: list[float], hand: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ours, "o-", label="bigbatch")
    ax.plot(hand, "s-", label="hand-written DDP")
    ax.set_xlabel("interleaved pair")
    ax.set_ylabel("samples/s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
