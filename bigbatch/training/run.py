"""One rank's whole run: build, resume, train, summarise; preemption signals end it cleanly."""

from __future__ import annotations

import time

from bigbatch.training.build import build_trainer
from bigbatch.checkpoint.durable import write_durably
from bigbatch.checkpoint.rundir import open_run, release_run_dir
from bigbatch.config import Config
from bigbatch.exit_codes import INTERRUPTED
from bigbatch.training.guard import Diverged
from bigbatch.launch.failure import launched_rank
from bigbatch.launch.runtime import Runtime
from bigbatch.slurm.preemption import PreemptionHandler, preemption_signals, time_limit_signal


def run_training(cfg: Config, runtime: Runtime) -> dict:
    trainer = build_trainer(cfg, runtime)  # may raise ValueError before anything is written
    # Rank 0 locks the run dir and applies run.if_exists; the checkpoint's config is compared with this
    # one before loading. Bad input (a used or locked dir, a changed config) raises RunDirError here.
    open_run(cfg, runtime, trainer.checkpointer)
    if runtime.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_durably(cfg.run_dir / "config.yaml", cfg.to_yaml().encode())  # a full disk: old file kept
        trainer.progress.write(f"bigbatch: {cfg.run.name}: {runtime.world_size} rank(s), "
                               f"{trainer.total_samples} samples, model {cfg.model.name}, "
                               f"optimizer {cfg.optim.name}")
    # USR1 (Slurm's time-limit warning) and TERM (preemption) only set a flag; at the next step
    # boundary all ranks checkpoint together and rank 0 requeues the job when under Slurm.
    trainer.preemption = PreemptionHandler(preemption_signals(cfg.slurm.signal), rank=runtime.rank,
                                           requeue=cfg.slurm.requeue, log=trainer.progress.write,
                                           requeue_signals=[time_limit_signal(cfg.slurm.signal)],
                                           second_interrupt_kills=not launched_rank())
    start = time.perf_counter()
    trainer.preemption.install()
    try:
        result = trainer.fit()
    finally:
        trainer.progress.close()
        trainer.metrics.close()
        release_run_dir(cfg.run_dir)  # rank 0's lock; a dead process loses it anyway
        if not trainer.preemption.requested:  # a stopping rank keeps noting late signals (the
            trainer.preemption.uninstall()    # launcher's TERM) instead of dying of them
    if runtime.is_main:
        summarise(cfg, trainer, result, time.perf_counter() - start)
    if trainer.diverged:  # on every rank: exit code 3; rank 0's summary said why
        raise Diverged(trainer.diverged)
    if trainer.stopped_early and trainer.preemption.interrupted:
        raise SystemExit(INTERRUPTED)  # Ctrl-C: 130 on every rank that saw it, after the checkpoint
    return result


def summarise(cfg: Config, trainer, result: dict, elapsed: float) -> None:
    if trainer.diverged:
        latest = trainer.checkpointer.latest(log=lambda _: None)
        where = f"newest finite checkpoint {latest}" if latest else "no checkpoint to go back to"
        print(f"diverged: stopped at step {trainer.counters.step}: {trainer.diverged}; {where} "
              "(to resume from it with a lower LR: --set optim.lr=... --set checkpoint.allow_config_change=true)",
              flush=True)
        return
    if trainer.stopped_early and trainer.preemption.interrupted:
        print(f"interrupted (Ctrl-C): checkpoint at step {trainer.counters.step} saved; rerun the "
              "same command to resume", flush=True)
        return
    if trainer.stopped_early:
        requeued = "; job requeued" if trainer.preemption.requeued else ""
        print(f"preempted: checkpoint at step {trainer.counters.step} saved{requeued}; "
              f"rerun (or let Slurm restart) the same command to resume", flush=True)
        return
    extras = "  ".join(f"{k} {result[k]:.4f}" for k in ("loss", "val_loss", "val_accuracy", "val_ppl")
                       if k in result)
    print(f"done: {trainer.counters.step} steps, {trainer.counters.samples} samples in "
          f"{elapsed:.1f} s  {extras}  -> {cfg.run_dir}", flush=True)
