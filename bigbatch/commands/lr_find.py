"""`bigbatch lr-find CONFIG`: an LR range test with the run's own model, data, batch and optimizer.

The LR grows exponentially from --min-lr to --max-lr over --steps optimizer steps (the configured
schedule and scaling rule are bypassed), the sweep stops once the loss diverges, and the suggested
LR is where the smoothed loss falls fastest. Nothing of the real run is touched: no checkpoints,
no metrics.jsonl; only RUN_DIR/lr_find.png (and lr_find.json) are written, each whole or not at all
(temp file, rename). Rank 0 holds the run directory's lock for the whole sweep, as `train` does, so a
sweep never writes into a directory that a training run or another sweep is using. The suggestion is an
LR at the configured global batch; `optim_lr` in lr_find.json is the value for `optim.lr`, which the
scaling rule reads at `optim.lr_scaling.base_batch`.
"""

from __future__ import annotations

import io
import json
import math

from bigbatch.checkpoint.durable import write_durably
from bigbatch.checkpoint.rundir import holding_run_dir
from bigbatch.training.build import build_trainer
from bigbatch.config import Config
from bigbatch.launch.runtime import Runtime
from bigbatch.metrics import MetricsWriter
from bigbatch.optim.lr_finder import exponential_lrs, is_diverged, suggest_lr
from bigbatch.optim.lr_scaling import peak_lr


class SweepLR:
    """The LR of sweep step i, whatever the sample count; `peak` is the largest LR of the sweep."""

    def __init__(self, lrs: list[float], counters):
        self.lrs, self.counters = lrs, counters

    def peak(self, global_batch: int) -> float:
        return self.lrs[-1]

    def __call__(self, samples: int, global_batch: int) -> float:
        return self.lrs[min(self.counters.step, len(self.lrs) - 1)]


def run_lr_find(cfg: Config, runtime: Runtime, min_lr: float, max_lr: float, steps: int) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.run.max_steps, cfg.run.max_samples, cfg.run.epochs = steps, None, None
    cfg.checkpoint.at_end, cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes = False, None, None
    cfg.checkpoint.resume = "never"
    cfg.eval.at_end, cfg.eval.every_steps = False, None
    trainer = build_trainer(cfg, runtime)  # bad input fails here, before the run dir is touched
    with holding_run_dir(cfg.run_dir, runtime, trainer.progress.write):
        return sweep(cfg, runtime, trainer, min_lr, max_lr, steps)


def sweep(cfg: Config, runtime: Runtime, trainer, min_lr: float, max_lr: float, steps: int) -> dict:
    trainer.metrics = MetricsWriter(cfg.run_dir, enabled=False, tensorboard=False)
    lrs = exponential_lrs(min_lr, max_lr, steps)
    trainer.lr_at = SweepLR(lrs, trainer.counters)
    trainer.loss_every = 1  # the sweep reads every step's loss and stops on it
    losses: list[float] = []

    def record(t) -> dict:  # a metrics hook: keep each step's loss
        losses.append(t.last_loss)
        return {}

    def diverged(t) -> bool:  # the sweep ends at the first loss that diverged from the best so far
        return bool(losses) and is_diverged(losses[-1], min(losses[:-1], default=math.inf))

    trainer.after_step.append(record)
    trainer.should_stop = diverged
    trainer.fit()
    trainer.progress.close()
    tried = lrs[:len(losses)]
    suggested = suggest_lr(tried, losses)
    result = {"lrs": tried, "losses": losses, "suggested_lr": suggested, "global_batch": cfg.batch.global_batch,
              "optim_lr": suggested / lr_scale(cfg)}
    if runtime.is_main:
        write_durably(cfg.run_dir / "lr_find.json", json.dumps(result).encode())  # a killed sweep: old file
        result["plot"] = str(plot_sweep(result, cfg.run_dir / "lr_find.png"))
    return result


def lr_scale(cfg: Config) -> float:
    """f(B): what the scaling rule multiplies optim.lr by at the configured global batch. The sweep
    applies its LRs directly, so the LR to write into optim.lr is the suggestion divided by f(B)."""
    scaling = cfg.optim.lr_scaling
    return peak_lr(1.0, cfg.batch.global_batch, scaling.rule, scaling.base_batch, scaling.knee_batch)


def plot_sweep(result: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], marker=".")
    ax.axvline(result["suggested_lr"], color="tab:red", linestyle="--",
               label=f"suggested {result['suggested_lr']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_durably(path, image.getvalue())
    return path
