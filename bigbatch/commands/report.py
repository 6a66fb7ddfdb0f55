"""`bigbatch report RUN_DIR`: PNG plots of a run's metrics.jsonl, written next to it."""

from __future__ import annotations

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
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics here; pass a run directory (out_dir/name)")
    rows = read_metrics(path)
    train = [r for r in rows if r.get("kind", "train") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    panels = [("loss", train, "loss", "training loss"), ("val_loss", evals, "val_loss", "validation loss"),
              ("val_accuracy", evals, "val_accuracy", "validation accuracy"), ("lr", train, "lr", "learning rate"),
              ("global_batch", train, "global_batch", "global batch"),
              ("noise_scale", train, "noise_scale", "gradient noise scale"),
              ("comm_savings", train, "comm_savings", "uncompressed / sent bytes")]
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
