"""`bigbatch report RUN_DIR`: PNG plots of a run's metrics.jsonl, written next to it, and a throughput line."""

from __future__ import annotations

import statistics
from pathlib import Path

from bigbatch.metrics import METRICS_FILE, read_metrics


def _plot(ax, rows: list[dict], key: str, label: str) -> bool:
    points = [(r["samples"], r[key]) for r in rows if key in r]
    if not points:
        return False
    xs, ys = zip(*points)
    ax.plot(xs, ys, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("samples seen")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    return True


def write_report(run_dir: str | Path) -> list[Path]:
    """One PNG per quantity that the run logged; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(metrics_path(run_dir))
    train = [r for r in rows if r.get("kind", "train") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    panels = [("loss", train, "loss", "training loss"), ("val_loss", evals, "val_loss", "validation loss"),
              ("val_accuracy", evals, "val_accuracy", "validation accuracy"),
              ("val_ppl", evals, "val_ppl", "validation perplexity"), ("lr", train, "lr", "learning rate"),
              ("global_batch", train, "global_batch", "global batch"),
              ("noise_scale", train, "noise_scale", "gradient noise scale"),
              ("comm_savings", train, "comm_savings", "uncompressed / sent bytes"),
              ("tokens_per_s", train, "tokens_per_s", "tokens/s (all ranks)"),
              ("mfu", train, "mfu", "model FLOPs utilization")]
    written = []
    for name, subset, key, label in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        if _plot(ax, subset, key, label):
            ax.set_title(f"{run_dir.name}: {label}")
            fig.tight_layout()
            out = run_dir / f"{name}.png"
            fig.savefig(out, dpi=100)
            written.append(out)
        plt.close(fig)
    return written


def metrics_path(run_dir: Path) -> Path:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics here; pass a run directory (out_dir/name)")
    return path


def throughput_summary(run_dir: str | Path) -> str | None:
    """'throughput: median 5736 tokens/s (2868/rank), MFU 41.20% over 19 steps' for a sequence model,
    None otherwise. The first step (start-up, allocator warm-up, compilation) is left out."""
    rows = [r for r in read_metrics(metrics_path(Path(run_dir)))
            if r.get("kind", "train") == "train" and "tokens_per_s" in r and not r.get("skipped")]
    rows = rows[1:] if len(rows) > 1 else rows
    if not rows:
        return None
    median = {key: statistics.median(r[key] for r in rows) for key in ("tokens_per_s", "tokens_per_s_per_rank")}
    mfu_rows = [r["mfu"] for r in rows if "mfu" in r]
    mfu = f", MFU {100 * statistics.median(mfu_rows):.2f}%" if mfu_rows else ", MFU not reported (peak FLOPs unknown)"
    return (f"throughput: median {median['tokens_per_s']:.0f} tokens/s ({median['tokens_per_s_per_rank']:.0f}/rank)"
            f"{mfu} over {len(rows)} steps")
