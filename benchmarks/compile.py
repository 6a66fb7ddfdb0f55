"""model.compile (torch.compile, inductor) against eager: bigbatch's own step on one process, on CPU.

Two workloads: an MLP 784-1024-1024-10 on synthetic data (batch 256) and a GPT (4 layers, d_model
128, 4 heads, 128-token windows of a 2048-id token file, batch 32). For each, an eager and a compiled
trainer alternate segments of `--steps` steps (which goes first alternates too); the compiled one first
runs a warm-up segment whose first step includes compilation, reported apart. The table shows median
step times and the ratio compiled / eager (below 1: compiled is faster).

    python benchmarks/compile.py [--pairs 6] [--steps 10] [--quick]

Results (2026-12-06, 2 shared CPU cores, torch 2.13, 54 timed steps per variant): MLP 20.7 ms eager,
21.0 ms compiled (1.02: matmul-bound, nothing to fuse); GPT 213.1 ms eager, 202.6 ms compiled (0.95).
First compiled step 3.1 s (MLP) and 7.8 s (GPT), with inductor's on-disk cache warm from earlier runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
from benchmarks.prefetch import save_figure, segment  # noqa: E402
from bigbatch.launch.runtime import Runtime  # noqa: E402
from bigbatch.training.build import build_trainer  # noqa: E402
from bigbatch.validate import validate_config  # noqa: E402

OUT = Path(__file__).parent / "out"


def workloads(tmp: Path, quick: bool) -> dict[str, dict]:
    tokens = tmp / "tokens.bin"
    np.random.default_rng(0).integers(0, 2048, size=2**20, dtype=np.uint16).tofile(tokens)
    width, layers = (64, 1) if quick else (1024, 4)
    return {
        "mlp": {"data": {"name": "synthetic", "shape": [784], "num_classes": 10, "num_samples": 8192},
                "model": {"name": "mlp", "hidden": [width, width]}, "batch": {"global_batch": 256}},
        "gpt": {"data": {"name": "tokens", "path": str(tokens), "seq_len": 128, "vocab_size": 2048},
                "model": {"name": "gpt", "n_layer": layers, "n_head": 4, "d_model": 128},
                "batch": {"global_batch": 8 if quick else 32}},
    }


def trainer(tmp: Path, name: str, workload: dict, compiled: bool):
    raw = {"run": {"name": name, "out_dir": str(tmp), "max_steps": 10**6, "deterministic": False},
           "data": workload["data"], "model": {**workload["model"], "compile": compiled},
           "optim": {"name": "adamw", "lr": 1e-3}, "batch": workload["batch"],
           "eval": {"at_end": False}, "checkpoint": {"at_end": False},
           "metrics": {"tensorboard": False, "progress": "none"}}
    built = build_trainer(validate_config(raw), Runtime(0, 1, 0, torch.device("cpu"), None))
    built.strategy.model.train()
    return built


def measure(tmp: Path, name: str, workload: dict, pairs: int, steps: int) -> dict:
    trainers = {c: trainer(tmp, f"{name}-{c}", workload, c) for c in (False, True)}
    began = time.perf_counter()
    segment(trainers[True], 1)  # the first step compiles (left out of `segment`'s times)
    compile_s = time.perf_counter() - began
    segment(trainers[False], 1)
    times: dict[bool, list[float]] = {False: [], True: []}
    for pair in range(pairs):
        for compiled in ((False, True) if pair % 2 == 0 else (True, False)):
            times[compiled] += segment(trainers[compiled], steps)
    for t in trainers.values():
        t.batches.close()
        t.metrics.close()
    return {"times": times, "compile_s": compile_s}


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    for offset, compiled in ((-0.2, False), (0.2, True)):
        medians = [1000 * statistics.median(results[n]["times"][compiled]) for n in names]
        ax.bar([i + offset for i in range(len(names))], medians, width=0.4,
               label="compiled (inductor)" if compiled else "eager")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"model.compile on CPU ({torch.get_num_threads()} threads)")
    ax.legend()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT / "compile.png")
    parser.add_argument("--quick", action="store_true", help="small models, few steps (smoke test)")
    parser.add_argument("--pairs", type=int, default=6, help="segment pairs (eager, compiled) per workload")
    parser.add_argument("--steps", type=int, default=10, help="steps per segment")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.steps = 1, 3
    with tempfile.TemporaryDirectory(prefix="bigbatch-compile-") as tmp:
        results = {name: measure(Path(tmp), name, workload, args.pairs, args.steps)
                   for name, workload in workloads(Path(tmp), args.quick).items()}
    print(f"\n{'model':<6} {'steps':>6} {'eager ms':>9} {'compiled ms':>12} {'compiled/eager':>15} {'compile s':>10}")
    for name, result in results.items():
        eager, compiled = (statistics.median(result["times"][c]) for c in (False, True))
        print(f"{name:<6} {len(result['times'][True]):>6} {1000 * eager:>9.1f} {1000 * compiled:>12.1f} "
              f"{compiled / eager:>15.2f} {result['compile_s']:>10.1f}")
    print(f"plot: {plot(results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
