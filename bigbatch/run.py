"""One rank's whole run: prepare the run directory, build the trainer, train, summarise."""

from __future__ import annotations

import time

from bigbatch.build import build_trainer
from bigbatch.config import Config
from bigbatch.launch.runtime import Runtime


def run_training(cfg: Config, runtime: Runtime) -> dict:
    trainer = build_trainer(cfg, runtime)  # may raise ValueError before anything is written
    trainer.checkpointer.resume()  # an invalid explicit checkpoint.resume path raises here too
    if runtime.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())
        trainer.progress.write(f"bigbatch: {cfg.run.name}: {runtime.world_size} rank(s), "
                               f"{trainer.total_samples} samples, model {cfg.model.name}, "
                               f"optimizer {cfg.optim.name}")
    start = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        trainer.progress.close()
        trainer.metrics.close()
    if runtime.is_main:
        elapsed = time.perf_counter() - start
        extras = "  ".join(f"{k} {result[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy", "val_ppl")
                           if k in result)
        print(f"done: {trainer.counters.step} steps, {trainer.counters.samples} samples in "
              f"{elapsed:.1f} s  {extras}  -> {cfg.run_dir}", flush=True)
    return result
