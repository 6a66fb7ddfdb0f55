"""Activation rematerialization: saved bytes and step time per remat policy, and ZeRO state per rank.

    python benchmarks/remat.py            # GPT 12×256, T=256, batch 8: a few minutes on 2 CPU cores
    python benchmarks/remat.py --quick    # a tiny GPT, seconds (smoke test)

Table 1, per policy: bytes saved for backward by one forward + loss (measured with SavedTensorMeter),
the planner's estimate beside it, and the median forward+backward time over timed iterations after
warmup (policies interleaved round-robin, so drift of the machine hits all alike). The goal: full
remat saves ≥ 3× fewer bytes at ≤ 1.35× the step time of no remat.
Table 2: per-rank parameter, gradient and AdamW-state bytes of this GPT under ddp and zero1/2/3 on 2
and 4 ranks from the planner, and beside them the optimizer-state bytes measured on real gloo ranks
(the largest over the ranks, after one AdamW step through each strategy).
Writes OUT/remat.png (bars: bytes and step time per policy).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bigbatch.memory.activation import measure_saved_bytes
from bigbatch.models.gpt import GPT
from bigbatch.memory.planner import (STRATEGIES, GPTSpec, format_bytes, optimizer_state_bytes, rank_state)
from bigbatch.memory.remat import POLICIES, apply_remat
from bigbatch.testing import run_ranks

FULL = dict(n_layer=12, d_model=256, n_head=8, seq_len=256, vocab=65, batch=8, warmup=2, iters=7)
QUICK = dict(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab=65, batch=2, warmup=1, iters=2)
GOAL_BYTES, GOAL_TIME = 3.0, 1.35


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def step_seconds(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    lm_loss(model(idx), targets).backward()
    return time.perf_counter() - start


def measure(size: dict, k: int) -> list[dict]:
    torch.manual_seed(0)
    base = GPT(size["vocab"], size["seq_len"], size["n_layer"], size["n_head"], size["d_model"])
    spec = GPTSpec(size["n_layer"], size["d_model"], size["n_head"], size["vocab"], size["seq_len"])
    idx = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"]))
    targets = torch.randint(0, size["vocab"], (size["batch"], size["seq_len"]))
    models = {p: apply_remat(copy.deepcopy(base), p, k) for p in POLICIES}
    with_loss = lambda out: lm_loss(out, targets)  # noqa: E731
    rows = {p: {"policy": p, "measured": measure_saved_bytes(m, idx, with_loss),
                "estimate": spec.activations(p, k).saved(size["batch"]), "times": []}
            for p, m in models.items()}
    for _ in range(size["warmup"]):
        for model in models.values():
            step_seconds(model, idx, targets)
    for _ in range(size["iters"]):
        for policy, model in models.items():
            rows[policy]["times"].append(step_seconds(model, idx, targets))
    for row in rows.values():
        row["seconds"] = statistics.median(row["times"])
    return list(rows.values())


def remat_table(rows: list[dict]) -> str:
    none = next(r for r in rows if r["policy"] == "none")
    lines = [f"{'policy':>10} {'saved (measured)':>17} {'planner':>12} {'error':>7} "
             f"{'bytes ÷':>8} {'step ms':>9} {'min–max ms':>13} {'time ×':>7}"]
    for r in rows:
        spread = f"{1000 * min(r['times']):.0f}–{1000 * max(r['times']):.0f}"
        lines.append(f"{r['policy']:>10} {format_bytes(r['measured']):>17} "
                     f"{format_bytes(r['estimate']):>12} {r['estimate'] / r['measured'] - 1:>+7.1%} "
                     f"{none['measured'] / r['measured']:>8.2f} {1000 * r['seconds']:>9.1f} "
                     f"{spread:>13} {r['seconds'] / none['seconds']:>7.2f}")
    full = next(r for r in rows if r["policy"] == "full")
    fewer, slower = none["measured"] / full["measured"], full["seconds"] / none["seconds"]
    met = fewer >= GOAL_BYTES and slower <= GOAL_TIME
    lines.append(f"goal (full: ≥ {GOAL_BYTES:.0f}× fewer bytes at ≤ {GOAL_TIME}× time): "
                 f"{fewer:.2f}× fewer at {slower:.2f}× time: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def measured_state_bytes(rank: int, world_size: int, size: dict) -> dict[str, int]:
    """On one gloo rank: this rank's AdamW state bytes after one step, per strategy."""
    from bigbatch.compression.factory import build_compressor
    from bigbatch.config import OptimConfig
    from bigbatch.distributed.ddp import DDPStrategy
    from bigbatch.distributed.zero import ShardedStrategy, Zero1Strategy, held_optimizer_bytes as held

    cpu, found = torch.device("cpu"), {}
    idx = torch.randint(0, size["vocab"], (1, size["seq_len"]))
    for name in STRATEGIES:
        torch.manual_seed(0)
        model = GPT(size["vocab"], size["seq_len"], size["n_layer"], size["n_head"], size["d_model"])
        if name in ("ddp", "zero1"):
            cls = DDPStrategy if name == "ddp" else Zero1Strategy
            strategy = cls(model, cpu, 25.0, build_compressor("none"))
        else:
            strategy = ShardedStrategy(model, cpu, stage=int(name[-1]))
        cfg = OptimConfig(name="adamw", lr=1e-3)
        optimizer = strategy.build_optimizer(cfg)
        lm_loss(strategy.model(idx), idx).backward()
        optimizer.step()
        found[name] = held(optimizer)
    return found


def zero_table(spec: GPTSpec, size: dict, optimizer: str = "adamw") -> str:
    per_param = optimizer_state_bytes(optimizer)
    lines = [f"per-rank model state, {spec.n_params:,} parameters, {optimizer} "
             f"({per_param} B/param state), fp32 (planner; 'measured': largest rank, real gloo ranks):",
             f"{'ranks':>5} {'strategy':>8} {'params':>11} {'grads':>11} {'optimizer':>11} "
             f"{'measured':>11} {'p+g+opt':>11} {'comm buf':>11}"]
    for world in (2, 4):
        measured = run_ranks(measured_state_bytes, world, size, timeout_s=300)
        for strategy in STRATEGIES:
            s = rank_state(strategy, spec, world, per_param)
            top = max(rank[strategy] for rank in measured)
            lines.append(f"{world:>5} {strategy:>8} " + " ".join(
                f"{format_bytes(v):>11}" for v in (s.params, s.grads, s.optimizer, top,
                                                   s.params + s.grads + s.optimizer, s.comm_buffers)))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in rows]
    xs = range(len(rows))
    fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    ax_bytes.bar([x - 0.2 for x in xs], [r["measured"] / 2**20 for r in rows], 0.4, label="measured")
    ax_bytes.bar([x + 0.2 for x in xs], [r["estimate"] / 2**20 for r in rows], 0.4, label="planner")
    ax_bytes.set(xticks=list(xs), xticklabels=names, ylabel="MiB saved for backward",
                 title="activation bytes")
    ax_bytes.legend()
    ax_time.bar(list(xs), [1000 * r["seconds"] for r in rows], 0.5, color="tab:green")
    ax_time.set(xticks=list(xs), xticklabels=names, ylabel="ms (median)", title="forward+backward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, for a smoke test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out",
                        help="directory for remat.png")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--k", type=int, default=2, help="every_k: wrap blocks 0, k, 2k, …")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    print(f"GPT n_layer={size['n_layer']} d_model={size['d_model']} n_head={size['n_head']} "
          f"T={size['seq_len']} V={size['vocab']} batch={size['batch']}, fp32, every_k k={args.k}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {size['iters']} steps after {size['warmup']} warmup")
    rows = measure(size, args.k)
    print(remat_table(rows))
    print()
    print(zero_table(GPTSpec(size["n_layer"], size["d_model"], size["n_head"], size["vocab"],
                             size["seq_len"]), size))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "remat.png")
    print(f"\nwrote {args.out / 'remat.png'}")


if __name__ == "__main__":
    main()
