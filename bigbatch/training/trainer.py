"""The training loop. Everything it uses is built elsewhere (bigbatch.training.build) and handed in."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from bigbatch.memory.activation import SavedTensorMeter
from bigbatch.checkpoint.manager import CheckpointManager
from bigbatch.checkpoint.stateful import Counters
from bigbatch.config import EvalConfig, split_batch
from bigbatch.data.base import DataBundle
from bigbatch.data.prefetch import StepBatches, StepKey
from bigbatch.data.sampler import GlobalSampler
from bigbatch.distributed.strategy import Strategy
from bigbatch.optim.averaging import NoAverage, WeightAverage
from bigbatch.training.evaluate import evaluate, task_loss
from bigbatch.training.guard import Diverged, GuardAction, NonFiniteSkips, NullGuard
from bigbatch.launch.runtime import Runtime
from bigbatch.metrics import MetricsWriter, Progress
from bigbatch.slurm.preemption import PreemptionHandler


class NoPreemption:
    """Stand-in when no preemption signal handler is installed: never asks to stop."""

    installed = False
    requested = False
    wants_requeue = False

    def after_checkpoint(self, requeue_agreed: bool | None = None) -> None:
        pass


class LRAt(Protocol):
    """(samples seen, global batch) -> LR; `peak(batch)` is the scaled peak (bigbatch.training.build.LRPolicy)."""

    def __call__(self, samples: int, global_batch: int) -> float: ...

    def peak(self, global_batch: int) -> float: ...


@dataclass
class Trainer:
    runtime: Runtime
    strategy: Strategy           # owns the (wrapped) model and gradient sync
    optimizer: torch.optim.Optimizer
    data: DataBundle
    sampler: GlobalSampler
    batch_at: Callable[[int], int]          # samples seen -> global batch
    lr_at: LRAt
    micro_batch: int | None
    total_samples: int
    max_steps: int | None
    metrics: MetricsWriter
    progress: Progress
    eval_cfg: EvalConfig
    checkpointer: CheckpointManager
    grad_clip: float | None = None
    precision: str = "fp32"
    guard: NonFiniteSkips = field(default_factory=NullGuard)   # NullGuard or SpikeGuard
    preemption: PreemptionHandler | NoPreemption = field(default_factory=NoPreemption)
    after_step: list[Callable[["Trainer"], dict]] = field(default_factory=list)  # metrics hooks: report only
    should_stop: Callable[["Trainer"], bool] | None = None   # ends training early (lr-find's divergence)
    counters: Counters = field(default_factory=Counters)
    last_eval: dict = field(default_factory=dict)
    stopped_early: bool = False
    activation_every: int | None = None   # log saved-activation bytes every N steps
    _meter: SavedTensorMeter | None = None
    current_batch: int | None = None
    last_loss: float = math.nan
    last_grad_norm: float = math.nan
    diverged: str | None = None  # why training stopped on non-finite steps (exit code 3)
    # Steps between reads of the global loss (bigbatch.training.build.loss_read_every): 1 reads it
    # every step, as the spike guard needs; N > 1 keeps each step's local loss on the device and
    # reduces them all in one collective and one host sync every N steps (flush_losses).
    loss_every: int = 1
    _unwritten: list[dict] = field(default_factory=list)  # rows whose loss is still on the device
    batches: StepBatches | None = None  # a step's micro-batches (PrefetchingBatches gathers ahead)
    loss_fn: Callable = task_loss          # (outputs, targets) -> mean loss; model.loss names another
    throughput: Callable[[dict], dict] | None = None  # a step row -> tokens/s, MFU (metrics.Throughput)
    averaging: WeightAverage | NoAverage = field(default_factory=NoAverage)  # ema: EMA/SWA of the weights

    def __post_init__(self) -> None:
        if self.batches is None:
            self.batches = StepBatches(self.data.train, self.sampler, self.runtime.device)
        hooks = getattr(self.checkpointer, "before_save", None)
        if hooks is not None:  # a checkpoint never points past metrics rows that are not on disk
            hooks += [self.flush_losses, self.metrics.sync]

    def fit(self) -> dict:
        """Train until the sample or step budget is spent (or a preemption, or divergence: then
        `diverged` says why, and no checkpoint is written); returns the last row."""
        self.strategy.model.train()
        self.metrics.start_at(self.counters.samples)  # after a resume: TensorBoard drops later points
        try:
            row = self.train_steps()
        except Diverged as err:  # raised on every rank at the same step: the checks use global values
            self.flush_losses()
            self.diverged = str(err)
            return {"loss": self.last_loss}
        finally:
            self.batches.close()
        if self.stopped_early:
            return row
        self.maybe_evaluate(final=True)
        self.checkpointer.maybe_save(self.counters.step, self.counters.samples, final=True)
        return {**row, **self.last_eval}

    def train_steps(self) -> dict:
        row, timer = {}, time.perf_counter()
        while not self.finished():
            preempted, time_due, requeue = self.agreed_flags()
            if preempted:  # all ranks saw the flag at the same step boundary
                self.checkpointer.save(self.counters.step, self.counters.samples)
                self.preemption.after_checkpoint(requeue)  # rank 0 requeues on the time-limit signal
                self.stopped_early = True
                return row
            batch = self.batch_at(self.counters.samples)
            self.announce_batch(batch)
            lr = self.set_lr(self.lr_at(self.counters.samples, batch))
            loss, action = self.forward_backward(batch)  # loss: a float, or a tensor read later
            if action is GuardAction.ROLLBACK:
                self.rollback()
                continue
            if action is GuardAction.OK:
                loss, grad_norm, action = self.optimizer_step(loss)
            else:
                grad_norm = self.discard_gradients()
            if action is GuardAction.OK:
                self.guard.record(loss)  # the spike threshold follows accepted losses only
            self.last_grad_norm = grad_norm
            self.counters.step += 1
            self.counters.samples += batch
            # every step, taken or skipped: DiLoCo counts it and runs its outer step when due
            outer = self.strategy.after_step()
            # after the outer step: under DiLoCo the average follows the global weights it updates
            self.averaging.after_step(self.counters.step, self.counters.samples, action is GuardAction.OK)
            step_time, timer = time.perf_counter() - timer, time.perf_counter()
            row = self.log_step(loss, lr, batch, grad_norm, step_time, skipped=action is not GuardAction.OK,
                                extra=outer)
            self.guard.raise_if_diverged(self.counters.step)
            self.maybe_evaluate(final=False)
            self.checkpointer.maybe_save(self.counters.step, self.counters.samples, time_due=time_due)
        self.flush_losses()
        return row

    def forward_backward(self, batch: int) -> tuple[float | torch.Tensor, GuardAction]:
        """Accumulate this rank's share of the global batch; returns the global mean loss, or with
        `loss_every` > 1 this rank's mean loss as a device tensor (reduced later by flush_losses)."""
        model = self.strategy.model
        micro, accum = split_batch(batch, self.runtime.world_size, self.micro_batch)
        batches = self.batches.take(StepKey(self.counters.samples, batch, micro))
        self.gather_next(batch)
        loss_sum = torch.zeros((), device=self.runtime.device)
        for i, (x, y) in enumerate(batches):
            with self.strategy.sync_context(last_micro_step=i == accum - 1), self.autocast():
                with self.activation_meter(i):
                    loss = self.loss_fn(model(x), y)
                self.strategy.backward(self.backward_loss(loss, accum))
            loss_sum += loss.detach()
        if self.loss_every > 1:  # no collective, no host sync: the GPU queue keeps filling
            return loss_sum / accum, GuardAction.OK
        # Every rank saw an equal share, so the mean of rank means is the global-batch mean, and every
        # rank gets the same number: the guard's decision is the same everywhere.
        mean_loss = self.strategy.all_reduce_mean(loss_sum / accum).item()
        self.last_loss = mean_loss
        return mean_loss, self.guard.check(mean_loss, self.counters.step + 1)

    def gather_next(self, batch: int) -> None:
        """Names the step expected after this one, so that its batches are gathered while this one runs.
        A guess: if the batch changes meanwhile (adaptive batch, rollback) that step is gathered anew."""
        start, step = self.counters.samples + batch, self.counters.step + 1
        if start >= self.total_samples or (self.max_steps is not None and step >= self.max_steps):
            return
        following = self.batch_at(start)
        try:
            micro, _ = split_batch(following, self.runtime.world_size, self.micro_batch)
        except ValueError:  # an unusable batch fails at its own step, not at the guess
            return
        self.batches.ahead(StepKey(start, following, micro))

    def backward_loss(self, loss: torch.Tensor, accum: int) -> torch.Tensor:
        """loss / accum: the mean over the rank's share of the global batch. When the loss is not read
        this step, a non-finite loss must still skip the step: multiplying by NaN (by 1.0 otherwise, so
        the gradients are bitwise those of loss / accum) makes every gradient NaN on this rank, hence the
        global norm, and the strategy declines the step as the loss check would have."""
        if self.loss_every == 1:
            return loss / accum
        return loss / accum * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)

    def activation_meter(self, micro_index: int) -> contextlib.AbstractContextManager:
        """Counts bytes saved for backward by the first micro-batch, at step 1 and every N steps."""
        step, every = self.counters.step + 1, self.activation_every
        if micro_index or every is None or (step % every and step != 1):
            return contextlib.nullcontext()
        self._meter = SavedTensorMeter(self.strategy.module)
        return self._meter

    def optimizer_step(self, loss: float | torch.Tensor) -> tuple[float | torch.Tensor, float, GuardAction]:
        """Clip and step; returns (loss, grad norm, action). The strategy does not step on a non-finite
        global gradient norm; the guard then counts the step as skipped (its gradients are dropped here
        either way). An unread loss is read on such a step (every rank agreed on it): when the loss
        itself was non-finite, the guard hears of the loss, as it would have before the step."""
        grad_norm = self.strategy.optimizer_step(self.optimizer, self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        norm, step = self.agreed_norm(grad_norm), self.counters.step + 1
        if not math.isfinite(norm) and torch.is_tensor(loss):
            loss = self.last_loss = self.strategy.all_reduce_mean(loss).item()
            if not math.isfinite(loss):
                return loss, math.nan, self.guard.check(loss, step)
        return loss, grad_norm, self.guard.check_grad_norm(norm, step)

    def agreed_norm(self, grad_norm: float) -> float:
        """DiLoCo replicas hold different gradients: one rank's non-finite norm counts as non-finite on
        every rank, so all take the same decision. Other strategies' norms are global already."""
        if self.runtime.world_size == 1 or self.strategy.global_grad_norm:
            return grad_norm
        flag = torch.tensor([0.0 if math.isfinite(grad_norm) else 1.0], device=self.runtime.device)
        return grad_norm if self.strategy.all_reduce_max(flag).item() == 0 else math.inf

    def discard_gradients(self) -> float:
        """A skipped step (non-finite loss): its gradients must not leak into the next step."""
        self.optimizer.zero_grad(set_to_none=True)
        return math.nan

    def agreed_flags(self) -> tuple[bool, bool, bool]:
        """(preempt, time-based checkpoint due, requeue wanted), OR-ed over all ranks; no collective
        when unused."""
        if not (self.preemption.installed or self.checkpointer.cfg.every_minutes):
            return False, False, False
        flags = torch.tensor([self.preemption.requested, self.checkpointer.time_due(),
                              self.preemption.wants_requeue], dtype=torch.float32, device=self.runtime.device)
        preempt, time_due, requeue = (self.strategy.all_reduce_max(flags) > 0).tolist()
        return preempt, time_due, requeue

    def rollback(self) -> None:
        """Loss spike: reload the latest checkpoint, then skip the batches the guard asks to skip."""
        self.optimizer.zero_grad(set_to_none=True)
        path = self.checkpointer.latest()
        if path is None:  # nothing to go back to: treat the spike as a skipped step
            self.counters.samples += self.batch_at(self.counters.samples)
            self.counters.step += 1
            return
        meta = self.checkpointer.load(path)
        self.metrics.rewind(self.counters.samples)  # TensorBoard: the steps retrained replace the old
        skipped = self.guard.after_rollback(meta["step"])
        while self.guard.take_skip():
            self.counters.samples += self.batch_at(self.counters.samples)
        self.metrics.write({"kind": "guard", "event": "rollback", "step": meta["step"],
                            "samples": self.counters.samples, "skipped_batches": skipped}, prefix="guard")

    def announce_batch(self, batch: int) -> None:
        """Log the derived per-rank split and peak LR at the start and whenever the batch changes."""
        if batch == self.current_batch:
            return
        self.flush_losses()  # the event follows the rows of the steps before it
        micro, accum = split_batch(batch, self.runtime.world_size, self.micro_batch)
        event = {"kind": "batch_change", "step": self.counters.step, "samples": self.counters.samples,
                 "global_batch": batch, "micro_batch": micro, "accumulation": accum,
                 "peak_lr": self.lr_at.peak(batch)}
        self.current_batch = batch
        self.metrics.write(event, prefix="batch")
        self.progress.write(f"global batch {batch} = {self.runtime.world_size} ranks x {accum} micro-batches "
                            f"x {micro}; peak lr {event['peak_lr']:.4g}")

    @contextlib.contextmanager
    def evaluation_weights(self, averaged: bool = False):
        """Schedule-free optimizers evaluate at their averaged point x, not at the training point y;
        `averaged` swaps in the weight average (ema:) inside that, and the weights back after."""
        switch = callable(getattr(self.optimizer, "eval", None))
        if switch:
            self.optimizer.eval()
        try:
            with self.averaging.swapped_in(self.strategy.module) if averaged else contextlib.nullcontext():
                yield
        finally:
            if switch:
                self.optimizer.train()

    def finished(self) -> bool:
        if self.max_steps is not None and self.counters.step >= self.max_steps:
            return True
        if self.should_stop is not None and self.should_stop(self):
            return True
        return self.counters.samples >= self.total_samples

    def set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def log_step(self, loss: float | torch.Tensor, lr: float, batch: int, grad_norm: float, step_time: float,
                 skipped: bool, extra: dict | None = None) -> dict:
        row = {"step": self.counters.step, "samples": self.counters.samples,
               "epoch": self.counters.samples / len(self.data.train), "loss": loss, "lr": lr,
               "global_batch": batch, "grad_norm": grad_norm, "step_time_s": step_time,
               "samples_per_s": batch / step_time if step_time > 0 else 0.0, "time": time.time()}
        if skipped:
            row["skipped"] = True
        if self._meter is not None:
            row["activation_bytes"], self._meter = self._meter.bytes, None
        row.update(extra or {})
        if self.throughput is not None:
            row.update(self.throughput(row))
        for hook in self.after_step:
            row.update(hook(self))
        self._unwritten.append(row)
        if not torch.is_tensor(loss) or self.counters.step % self.loss_every == 0:
            self.flush_losses()
        return row

    def flush_losses(self) -> None:
        """Write the rows still waiting for their loss: the losses left on the device are stacked and
        averaged over ranks in one collective, read with one host sync. Called at the same step on every
        rank: every `loss_every` steps, before a checkpoint, an evaluation, a batch change and at the end."""
        waiting = [row for row in self._unwritten if torch.is_tensor(row["loss"])]
        if waiting:
            values = self.strategy.all_reduce_mean(torch.stack([row["loss"] for row in waiting])).tolist()
            for row, value in zip(waiting, values):
                row["loss"] = value
            self.last_loss = values[-1]
        for row in self._unwritten:
            self.metrics.write(row)
            self.progress.update(row)
        self._unwritten = []

    def maybe_evaluate(self, final: bool) -> None:
        every, step = self.eval_cfg.every_steps, self.counters.step
        due = self.eval_cfg.at_end if final else (every is not None and step % every == 0)
        if not due or (final and self.last_eval.get("step") == step):
            return
        self.flush_losses()
        result = self.evaluate_with(averaged=False)
        if self.averaging.eval_with_average:  # val_* from the averaged weights, val_*_raw from the model's
            averaged = self.evaluate_with(averaged=True) if self.averaging.count else result
            result = {**averaged, **{f"{key}_raw": value for key, value in result.items()},
                      "weight_average_updates": self.averaging.count}
        self.last_eval = {"step": step, "samples": self.counters.samples, **result}
        self.metrics.write({"kind": "eval", **self.last_eval}, prefix="eval")
        self.progress.write("eval " + "  ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items()))

    def evaluate_with(self, averaged: bool) -> dict:
        with self.evaluation_weights(averaged):
            return evaluate(self.strategy.model, self.data.val, self.data.task, self.strategy,
                            self.runtime.rank, self.runtime.world_size, self.eval_cfg.batch_size,
                            self.eval_cfg.max_batches, self.runtime.device, self.autocast, self.loss_fn)
