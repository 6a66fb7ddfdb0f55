"""Why does PowerSGD rank 2 cost the demo 4 points under LAMB, and what does not fix it? (issue 15)

    python benchmarks/powersgd_probes.py [--variants NAME ...] [--steps N] [--out DIR] [--quick]

A single-process simulation of the demo (`configs/fashion_mnist.yaml`: MLP 1024x1024, LAMB with weight
decay 0.01 on matrices, global batch 4096 as two ranks' halves of 2048, peak LR 0.002 x 8 x sqrt(2)
after 15 warmup steps, cosine to 0 over 147 steps), written out by hand so that every step of the
compressor and of LAMB can be changed: each "rank" computes its own gradient of its half batch, the
variant turns the two into the averaged update direction, and LAMB (Adam moments, bias correction,
trust ratio ||w|| / ||u|| per matrix, 1 for biases) steps. PowerSGD here is the one of
bigbatch.compression.powersgd (P = M Q summed over ranks, orthogonalized, Q = M^T P averaged, warm
start, error feedback per rank, 1-D tensors plain), compressing after step `start` (compressed steps
start + 1 on, as `compression.start_step`). It reproduces the real 2-rank runs (none 0.8841, PowerSGD
rank 2 0.8418 with `bigbatch launch`): none 0.8833, r2 0.8412.

Variants, final validation accuracy, measured 2026-12-06 with `python benchmarks/powersgd_probes.py`
(all variants, 29 minutes; the machine was shared, which changes the wall seconds, not the results;
`momentum frozen ratio` was run on its own with `--variants "momentum frozen ratio"`):

    none                     0.8833   uncompressed
    r2                       0.8412   PowerSGD rank 2 on the gradient after step 10 (the defaults)
    r2 start 15              0.8392   compression after LAMB's warmup (15 steps)
    lr 0.001 none / r2       0.8750 / 0.8441   half the LR: the gap narrows to 3.1 points, the
                             uncompressed run loses 0.8
    only blocks.0 / blocks.1 / head   0.8613 / 0.8760 / 0.8848   rank 2 on one matrix, the others
                             plain: the input layer (1024 x 784) carries most of the loss
    first r5 / first r8      0.8641 / 0.8729   rank 5 or 8 on the input layer, 2 elsewhere (rank 5
                             stays within 100x fewer bytes a step: 69 KB)
    momentum                 0.8137   1-bit-LAMB style after step 15: v frozen, each rank's
                             momentum (the shared m updated with its own gradient) compressed with
                             error feedback, the compressed mean becomes the shared m
    momentum frozen ratio    diverged (NaN)   the same with each matrix's trust ratio frozen too
    whitened / whitened live 0.8372 / 0.8225   compress g / sqrt(v_hat), Adam's own coordinates (v
                             frozen after step 15 / updated from the decompressed gradient): a
                             sign-like matrix that is far from low rank
    factored / factored live 0.8441 / 0.8350   rows and columns scaled by Adafactor-style factors
                             of v_hat (keeps the gradient's rank, evens out the column energies)

Quantized factors (`compression.factor_bits`), measured 2026-12-06 23:15-23:50 UTC with
`--variants "r8" "r8 int8" "r4 int8" "r16 int4"` (load 8-10 on 2 cores, which moves the wall seconds):

    r8                       0.8774   rank 8, float32 P and Q (real 2-rank run: 0.8819)
    r8 int8                  0.8795   rank 8, P and Q as int8 codes with a float32 scale per 64 entries
                             of a column: the rounding costs nothing measurable, and the bytes are
                             about rank 2's in float32 (49.8 KB a compressed step, 150x fewer)
                             (blocks across columns instead of along them: 0.8785)
    r4 int8                  0.8724
    r16 int4                 0.8775   the same bytes again as r8 int8; no better (across columns: 0.8698)

Real 2-rank runs of the demo with quantized factors, 3 seeds each (`bigbatch launch --nproc-per-node 2
configs/fashion_mnist.yaml --set run.seed=S --set compression.method=powersgd --set
compression.rank=R --set compression.factor_bits=8`; uncompressed without the compression keys),
2026-12-06 23:20-23:50 UTC, val accuracy for seeds 0 / 1 / 2 (mean), gradient bytes per compressed step:

    none                     0.8845 / 0.8854 / 0.8863 (0.8854)   7,454,760 B
    rank 8, int8 factors     0.8823 / 0.8816 / 0.8817 (0.8819)      49,800 B  (150x fewer; -0.35 pt)
    rank 12, int8 factors    0.8862 / 0.8822 / 0.8831 (0.8838)      68,384 B  (109x fewer; -0.16 pt)

Rank 12 at 8 bits meets the accuracy and bytes of the issue's goal on the demo (within 0.3 points on
the mean of 3 seeds, two seeds at -0.32; >= 100x fewer bytes a compressed step), but not at rank 2:
the byte budget is spent on a higher rank at lower precision. The char-GPT does not follow
(benchmarks/frontier.py: val loss +3.3 % with rank 8 at 8 bits against 1 % wanted).

Real 2-rank runs of the demo, measured earlier the same day (`bigbatch launch --nproc-per-node 2
configs/fashion_mnist.yaml --set compression.method=powersgd --set compression.rank=2 --set
KEY=VALUE`): start_step 15 (the end of warmup) 0.846, start_step 40 0.8496, min_compression_rate 5
(head sent plain, 93x fewer bytes) 0.8434, both 0.8478, error_feedback false 0.8367. With a
temporary patch of LAMB (not kept): second moment frozen at step 15 (uncompressed: 0.8812) and rank 2
from step 15, 0.8443; trust ratio frozen too, 0.8382 (uncompressed diverged). Five power iterations
at the first compressed step (an earlier version of this simulation): 0.8426. The gradient itself is low
rank (a rank-2 approximation holds 86-99 % of each matrix's energy mid-training, measured on the
uncompressed run), LAMB's momentum much less (50-60 %). None of these reaches the issue's goal (0.3
points at >= 100x fewer bytes a step); rank 4 costs 1.3 points (the issue's table) at 86x. What does:
DiLoCo (benchmarks/frontier.py): H=50 with int4 pseudo-gradients ends 0.5 points below DDP at 356x
fewer bytes over the run, fp16 at H=20 0.1 points at 40x, while PowerSGD rank 2's 157x a compressed
step is 18x over the run (its 10 plain steps send 74.5 of its 83.5 MB) for 4 points.

Is it LAMB's fault? (issue 15's hypothesis: the PowerSGD paper loses nothing at rank 2 with SGD-momentum.)
`Variant.optimizer` strips LAMB down (see `Lamb`): "adam" is LAMB without the trust ratio (AdamW, same
moments, eps and decoupled decay 0.01 on matrices), "sgd" drops v too: PyTorch's SGD(momentum=0.9,
nesterov=False), decay 0.01 on matrices added to the step as LAMB's. Same warmup and cosine; `lr` is at
batch 256 as the config's (peak = lr x 8 x sqrt(2), in brackets); each optimizer's LR swept uncompressed,
then rank 2 (the defaults) at the best one. Measured 2026-12-07 02:15-03:05 UTC with
`python benchmarks/powersgd_probes.py --variants NAME ...`, one process at a time (load 1-5 on 2 shared
cores, 1-3 minutes a variant; --steps 441 for the last rows):

    sgd none lr 0.01 / 0.03 / 0.055 / 0.1        0.8616 / 0.8656 / NaN / NaN   (0.11 / 0.34 / 0.62 / 1.13)
    adam none lr 0.0001 / 0.0003 / 0.001 / 0.003 0.8678 / 0.8798 / 0.8828 / 0.8724   (0.0011 ... 0.034)

    optimizer, lr           none     rank 2            rank 2 - none
    lamb 0.002              0.8833   0.8412            -4.2 pt  (rerun with this code: the same digits)
    adam 0.001 (best)       0.8828   0.8434            -3.9 pt; rank 8 0.8804 (-0.2), rank 1 0.7852
    sgd 0.03 (best)         0.8656   NaN               diverges; without error feedback 0.7912 (-7.4 pt)
    sgd 0.01                0.8616   0.8161            -4.6 pt; without error feedback 0.8203; rank 1 0.7572
    sgd 0.01, 441 steps     0.8870   0.8689            -1.8 pt  (3x the steps, same schedule shape)
    adam 0.001, 441 steps   0.8968   0.8759            -2.1 pt

The loss is not LAMB's: without the trust ratio (Adam) rank 2 costs 3.9 points, without per-coordinate
normalization too (SGD-momentum) 4.6 points at a stable LR, and at SGD's best LR it diverges. What
shrinks it is the length of the run, for both (3x the steps at the same LR, not re-swept: SGD 4.6 -> 1.8
points, Adam 3.9 -> 2.1, still far from 0.3); the paper's lossless rank 2 was on CIFAR-10 ResNet-18 and a
WikiText-2 LSTM trained for many more epochs than this 10-epoch schedule (their exact lengths not
rechecked here). One seed (0) each.

Output: a table on stdout and OUT/powersgd_probes.{json,png} (OUT defaults to benchmarks/out).
About 2-4 minutes per variant on one thread; `--quick` (3 steps, two variants) is the smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bigbatch` importable
from bigbatch.compression.quantize import dequantize, quantize  # noqa: E402
from bigbatch.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from bigbatch.models.mlp import MLP  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
BATCH, RANKS, WARMUP, BETAS, EPS, DECAY = 4096, 2, 15, (0.9, 0.999), 1e-6, 0.01
BLOCK = 64  # elements per float32 scale of quantized factors (compression.quantize's default)


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str = "grad"  # none | grad | momentum | whitened | factored
    live_v: bool = False  # whitened/factored: keep updating v from the decompressed gradient
    rank: int = 2
    first_rank: int = 0  # rank of the input layer (blocks.0); 0: `rank`
    only: str = ""  # compress only parameters whose name starts with this
    lr: float = 0.002
    start: int = 10  # first compressed step is start + 1, as compression.start_step
    freeze_ratio: bool = False  # compressed steps reuse the trust ratio of the last full step
    factor_bits: int = 0  # 8 or 4: each rank's P and Q as int8/int4 codes, float32 scale per 64 (0: float32)
    optimizer: str = "lamb"  # lamb | adam (LAMB without the trust ratio) | sgd (momentum 0.9); see Lamb
    error_feedback: bool = True  # False: each rank's residual is dropped instead of added to its next gradient


VARIANTS = (Variant("none", "none"), Variant("r2"), Variant("lr 0.001 none", "none", lr=0.001),
            Variant("lr 0.001 r2", lr=0.001), Variant("r2 start 15", start=15), Variant("only blocks.0", only="blocks.0"),
            Variant("only blocks.1", only="blocks.1"), Variant("only head", only="head"),
            Variant("first r5", first_rank=5), Variant("first r8", first_rank=8),
            Variant("momentum", "momentum", start=15),
            Variant("momentum frozen ratio", "momentum", start=15, freeze_ratio=True), Variant("whitened", "whitened", start=15),
            Variant("whitened live", "whitened", live_v=True, start=15), Variant("factored", "factored"),
            Variant("factored live", "factored", live_v=True), Variant("r8", rank=8),
            Variant("r8 int8", rank=8, factor_bits=8), Variant("r16 int4", rank=16, factor_bits=4),
            Variant("r4 int8", rank=4, factor_bits=8),
            *(Variant(f"sgd none lr{lr:g}", "none", optimizer="sgd", lr=lr) for lr in (0.01, 0.03, 0.055, 0.1)),
            *(Variant(f"adam none lr{lr:g}", "none", optimizer="adam", lr=lr)
              for lr in (0.0001, 0.0003, 0.001, 0.003)),
            Variant("sgd r2", optimizer="sgd", lr=0.03), Variant("sgd r2 lr0.01", optimizer="sgd", lr=0.01),
            Variant("sgd r2 no ef", optimizer="sgd", lr=0.03, error_feedback=False),
            Variant("sgd r2 no ef lr0.01", optimizer="sgd", lr=0.01, error_feedback=False),
            Variant("sgd r1 lr0.01", rank=1, optimizer="sgd", lr=0.01),
            *(Variant(f"adam r{r}", rank=r, optimizer="adam", lr=0.001) for r in (1, 2, 8)))


class PowerSGD:
    """Rank-r PowerSGD of a list of per-rank matrices with warm-started Q and per-rank error feedback (optional)."""

    def __init__(self, factor_bits: int = 0, error_feedback: bool = True):
        self.q, self.error, self.bits, self.feedback = {}, {}, factor_bits, error_feedback

    def sent(self, factor: torch.Tensor) -> torch.Tensor:
        """A rank's factor (rows x r) as the others receive it: itself, or its int8/int4 round trip,
        quantized column by column (blocks of one column share a scale: the columns' magnitudes
        differ by the singular values)."""
        if not self.bits:
            return factor
        columns = factor.t().contiguous()
        return dequantize(*quantize(columns, self.bits, BLOCK), columns.shape, BLOCK).t()

    def mean(self, name: str, matrices: list[torch.Tensor], rank: int) -> torch.Tensor:
        inputs = [m + self.error.get((name, i), 0) for i, m in enumerate(matrices)]
        if name not in self.q:
            seed = torch.Generator().manual_seed(len(self.q))
            self.q[name] = torch.randn(inputs[0].shape[1], rank, generator=seed)
        p, _ = torch.linalg.qr(sum(self.sent(m @ self.q[name]) for m in inputs))
        self.q[name] = sum(self.sent(m.t() @ p) for m in inputs) / len(inputs)
        approx = p @ self.q[name].t()
        for i, m in enumerate(inputs if self.feedback else ()):
            self.error[(name, i)] = m - approx
        return approx


class Lamb:
    """LAMB over named parameters, with the moments exposed so a variant can set m or freeze v.

    `kind` strips it down to tell its parts apart: "adam" drops the trust ratio (AdamW: lr x (m_hat /
    (sqrt(v_hat) + eps) + 0.01 w)); "sgd" also drops v: lr x (b + 0.01 w) with b = 0.9 b + g, PyTorch's
    SGD(momentum=0.9, nesterov=False) with the weight decay decoupled as LAMB's (added to the step, not
    to the momentum). Weight decay is on matrices only, as the demo's."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], kind: str = "lamb"):
        self.kind = kind
        self.m = {n: torch.zeros_like(p) for n, p in named}
        self.v = {n: torch.zeros_like(p) for n, p in named}
        self.frozen_v: dict[str, torch.Tensor] = {}
        self.ratio: dict[str, float] = {}  # the last trust ratio of each matrix

    def v_hat(self, name: str, t: int) -> torch.Tensor:
        return self.v[name] / (1 - BETAS[1] ** t)

    def accumulate(self, name: str, grad: torch.Tensor, t: int, v_from_grad: bool = True) -> None:
        self.m[name].mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
        if v_from_grad:
            self.v[name].mul_(BETAS[1]).addcmul_(grad, grad, value=1 - BETAS[1])

    def step(self, name: str, p: torch.Tensor, lr: float, t: int, v_hat: torch.Tensor | None = None,
             keep_ratio: bool = False) -> None:
        v_hat = self.v_hat(name, t) if v_hat is None else v_hat
        if self.kind == "sgd":  # m = 0.1 x (PyTorch's buffer b = 0.9 b + g), exactly, from m = 0
            u = self.m[name] / (1 - BETAS[0])
        else:
            u = self.m[name] / (1 - BETAS[0] ** t) / (v_hat.sqrt() + EPS)
        ratio = 1.0
        if p.ndim > 1:
            u = u + DECAY * p
        if p.ndim > 1 and self.kind == "lamb":
            w_norm, u_norm = p.norm(), u.norm()
            ratio = (w_norm / u_norm).item() if w_norm > 0 and u_norm > 0 else 1.0
            ratio = self.ratio[name] if keep_ratio and name in self.ratio else ratio
            self.ratio[name] = ratio
        p.sub_(lr * ratio * u)


def scale_for(variant: Variant, v_hat: torch.Tensor) -> torch.Tensor:
    """The coordinates the gradient is compressed in: elementwise sqrt(v_hat), or its rank-1
    (Adafactor-style) factorization, which leaves the gradient's rank unchanged."""
    if variant.mode == "whitened":
        return v_hat.sqrt() + EPS
    rows, cols = v_hat.mean(1, keepdim=True), v_hat.mean(0, keepdim=True)
    return (rows * cols / v_hat.mean()).sqrt() + EPS


def update(variant: Variant, opt: Lamb, psgd: PowerSGD, name: str, p: torch.Tensor, grads: list[torch.Tensor],
           t: int, lr: float) -> None:
    """One parameter's step under the variant."""
    compress = (variant.mode != "none" and t > variant.start and p.ndim == 2 and name.startswith(variant.only))
    rank = variant.first_rank if variant.first_rank and name.startswith("blocks.0") else variant.rank
    if not compress:
        opt.accumulate(name, sum(grads) / len(grads), t)
        return opt.step(name, p, lr, t)
    if variant.mode == "grad":
        opt.accumulate(name, psgd.mean(name, grads, rank), t)
        return opt.step(name, p, lr, t)
    frozen = opt.frozen_v.setdefault(name, opt.v_hat(name, t - 1))  # v_hat as the last full step left it
    if variant.mode == "momentum":  # each rank's momentum from the shared m and its own gradient
        opt.m[name] = psgd.mean(name, [BETAS[0] * opt.m[name] + (1 - BETAS[0]) * g for g in grads], rank)
        return opt.step(name, p, lr, t, v_hat=frozen, keep_ratio=variant.freeze_ratio)
    v_hat = opt.v_hat(name, t - 1) if variant.live_v else frozen
    scale = scale_for(variant, v_hat)
    grad = psgd.mean(name, [g / scale for g in grads], rank) * scale
    opt.accumulate(name, grad, t, v_from_grad=variant.live_v)
    opt.step(name, p, lr, t, v_hat=opt.v_hat(name, t) if variant.live_v else frozen)


def lr_at(t: int, steps: int, peak: float) -> float:
    if t <= WARMUP:
        return peak * t / WARMUP
    return peak * 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / max(1, steps - WARMUP)))


def run(variant: Variant, data, steps: int) -> dict:
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, [1024, 1024])
    named = list(model.named_parameters())
    opt, psgd = Lamb(named, variant.optimizer), PowerSGD(variant.factor_bits, variant.error_feedback)
    x, y = data.train.inputs, data.train.targets
    shuffle = torch.Generator().manual_seed(0)
    order, position = torch.randperm(len(y), generator=shuffle), 0
    peak, start = variant.lr * 8 * math.sqrt(2), time.perf_counter()
    for t in range(1, steps + 1):
        if position + BATCH > len(y):
            order, position = torch.randperm(len(y), generator=shuffle), 0
        batch, position = order[position:position + BATCH], position + BATCH
        grads = []
        for half in batch.chunk(RANKS):
            model.zero_grad()
            F.cross_entropy(model(x[half]), y[half]).backward()
            grads.append({n: p.grad.clone() for n, p in named})
        with torch.no_grad():
            for name, p in named:
                update(variant, opt, psgd, name, p, [g[name] for g in grads], t, lr_at(t, steps, peak))
    with torch.no_grad():
        out = model(data.val.inputs)
    return {**asdict(variant), "steps": steps, "val_accuracy": (out.argmax(1) == data.val.targets).float().mean().item(),
            "val_loss": F.cross_entropy(out, data.val.targets).item(), "wall_s": time.perf_counter() - start}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh([r["name"] for r in results], [r["val_accuracy"] for r in results], color="tab:blue")
    base = next((r["val_accuracy"] for r in results if r["name"] == "none"), None)
    if base is not None:
        ax.axvline(base, color="k", lw=1, label="none")
        ax.axvline(base - 0.003, color="r", ls="--", lw=1, label="goal: none - 0.3 pt")
        ax.legend(fontsize=8)
    lo = min(r["val_accuracy"] for r in results)
    ax.set_xlim(max(0.0, lo - 0.02), max(r["val_accuracy"] for r in results) + 0.01)
    ax.set(xlabel="final validation accuracy", title="PowerSGD under LAMB: simulated demo variants")
    ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"default: all of {[v.name for v in VARIANTS]}")
    parser.add_argument("--steps", type=int, default=147)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="3 steps of none and r2 (smoke test)")
    args = parser.parse_args(argv)
    known = {v.name: v for v in VARIANTS}
    names = ["none", "r2"] if args.quick else args.variants or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"powersgd_probes: --variants: unknown {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    data = load_fashion_mnist(FASHION_MNIST)
    steps = 3 if args.quick else args.steps
    results = []
    for name in names:
        variant = replace(known[name], start=1) if args.quick else known[name]  # quick: compress from step 2
        results.append(run(variant, data, steps))
        print(f"[{name}] val_accuracy {results[-1]['val_accuracy']:.4f}  {results[-1]['wall_s']:.0f} s", flush=True)
    head = f"{'variant':<20}{'mode':>10}{'rank':>6}{'lr':>8}{'val acc':>10}{'val loss':>10}{'wall s':>8}"
    print("\n".join([head, "-" * len(head)] + [
        f"{r['name']:<20}{r['mode']:>10}{r['rank']:>6}{r['lr']:>8g}{r['val_accuracy']:>10.4f}{r['val_loss']:>10.4f}"
        f"{r['wall_s']:>8.0f}" for r in results]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "powersgd_probes.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "powersgd_probes.png")
    print(f"wrote {args.out / 'powersgd_probes.json'}, {args.out / 'powersgd_probes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
