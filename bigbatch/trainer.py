"""The training loop. Everything it uses is built elsewhere (bigbatch.build) and handed in."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bigbatch.config import split_batch
from bigbatch.evaluate import evaluate, task_loss


@dataclass
class Counters:
    """Where the run stands: optimizer steps taken and training samples consumed."""

    step: int = 0
    samples: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])


@dataclass
class Trainer:
    runtime: Any              # bigbatch.launch.runtime.Runtime
    strategy: Any             # SingleProcess | DDPStrategy | ...: owns the (wrapped) model and sync
    optimizer: torch.optim.Optimizer
    data: Any                 # DataBundle
    sampler: Any              # GlobalSampler
    batch_at: Callable[[int], int]          # samples seen -> global batch
    lr_at: Callable[[int, int], float]      # (samples seen, global batch) -> LR
    micro_batch: int | None
    total_samples: int
    max_steps: int | None
    metrics: Any              # MetricsWriter
    progress: Any             # Progress
    eval_cfg: Any             # EvalConfig
    grad_clip: float | None = None
    precision: str = "fp32"
    checkpointer: Any = None  # object with maybe_save(trainer, final) and counters; None = off
    counters: Counters = field(default_factory=Counters)
    last_eval: dict = field(default_factory=dict)

    def fit(self) -> dict:
        """Train until the sample or step budget is spent; returns the last metrics row."""
        model, row = self.strategy.model, {}
        model.train()
        timer = time.perf_counter()
        while not self.finished():
            batch = self.batch_at(self.counters.samples)
            micro, accum = split_batch(batch, self.runtime.world_size, self.micro_batch)
            lr = self.set_lr(self.lr_at(self.counters.samples, batch))
            indices = self.sampler.rank_indices(self.counters.samples, batch)
            loss_sum = torch.zeros((), device=self.runtime.device)
            for i, chunk in enumerate(indices.split(micro)):
                x, y = (t.to(self.runtime.device) for t in self.data.train.batch(chunk))
                with self.strategy.sync_context(last_micro_step=i == accum - 1), self.autocast():
                    loss = task_loss(model(x), y)
                    (loss / accum).backward()  # mean over the rank's share of the global batch
                loss_sum += loss.detach()
            grad_norm = self.clip_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # Every rank saw an equal share, so the mean of rank means is the global-batch mean.
            mean_loss = self.strategy.all_reduce_mean(loss_sum / accum).item()
            self.counters.step += 1
            self.counters.samples += batch
            step_time, timer = time.perf_counter() - timer, time.perf_counter()
            row = self.log_step(mean_loss, lr, batch, grad_norm, step_time)
            self.maybe_evaluate(final=False)
            if self.checkpointer is not None:
                self.checkpointer.maybe_save(self, final=False)
        self.maybe_evaluate(final=True)
        if self.checkpointer is not None:
            self.checkpointer.maybe_save(self, final=True)
        return {**row, **self.last_eval}

    def finished(self) -> bool:
        if self.max_steps is not None and self.counters.step >= self.max_steps:
            return True
        return self.counters.samples >= self.total_samples

    def set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def clip_gradients(self) -> float:
        """Global gradient norm before clipping (clipping only when optim.grad_clip is set)."""
        params = [p for p in self.strategy.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    def log_step(self, loss: float, lr: float, batch: int, grad_norm: float, step_time: float) -> dict:
        row = {"step": self.counters.step, "samples": self.counters.samples,
               "epoch": self.counters.samples / len(self.data.train), "loss": loss, "lr": lr,
               "global_batch": batch, "grad_norm": grad_norm, "step_time_s": step_time,
               "samples_per_s": batch / step_time if step_time > 0 else 0.0, "time": time.time()}
        self.metrics.write(row)
        self.progress.update(row)
        return row

    def maybe_evaluate(self, final: bool) -> None:
        every, step = self.eval_cfg.every_steps, self.counters.step
        due = self.eval_cfg.at_end if final else (every is not None and step % every == 0)
        if not due or (final and self.last_eval.get("step") == step):
            return
        result = evaluate(self.strategy.model, self.data.val, self.data.task, self.strategy,
                          self.runtime.rank, self.runtime.world_size, self.eval_cfg.batch_size,
                          self.eval_cfg.max_batches, self.runtime.device, self.autocast)
        self.last_eval = {"step": step, "samples": self.counters.samples, **result}
        self.metrics.write({"kind": "eval", **self.last_eval}, prefix="eval")
        self.progress.write("eval " + "  ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items()))
