"""Held-out evaluation, sharded over the ranks and reduced: accuracy, or loss and perplexity."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.nn import functional as F

from bigbatch.data.base import Split


def task_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for classifiers (B, C) and language models (B, T, V) alike."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction=reduction)


def rank_positions(size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, valid): every world_size-th sample from `rank`, padded with sample 0 so that every
    rank runs the same number of forward passes (sharded models all-gather inside each forward)."""
    positions = torch.arange(math.ceil(size / world_size)) * world_size + rank
    valid = positions < size
    return torch.where(valid, positions, torch.zeros_like(positions)), valid


def take(obj: Any, keep: torch.Tensor) -> Any:
    """The kept rows of a batch: a tensor, or tuples, lists and dicts of tensors (custom outputs)."""
    if isinstance(obj, torch.Tensor):
        return obj[keep]
    if isinstance(obj, (tuple, list)):
        return type(obj)(take(item, keep) for item in obj)
    if isinstance(obj, dict):
        return {key: take(value, keep) for key, value in obj.items()}
    return obj


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, task: str, strategy, rank: int, world_size: int,
             batch_size: int, max_batches: int | None, device: torch.device, autocast,
             loss_fn: Callable = task_loss) -> dict:
    """Each rank evaluates every world_size-th sample; sums are all-reduced, so any world size agrees.

    A custom `loss_fn` (model.loss) returns a batch mean of unknown meaning: val_loss is its mean over
    samples, weighted by batch size, and no accuracy or perplexity is reported."""
    custom = loss_fn is not task_loss
    was_training = model.training
    model.eval()
    indices, valid = rank_positions(len(split), rank, world_size)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i, (chunk, keep) in enumerate(zip(indices.split(batch_size), valid.split(batch_size))):
        if max_batches is not None and i >= max_batches:
            break
        x, y = (t.to(device) for t in split.batch(chunk))
        with autocast():
            logits = model(x)
        keep = keep.to(device)
        logits, y = take(logits, keep), take(y, keep)
        if custom:
            count = int(keep.sum())
            totals[0] += loss_fn(logits, y).double() * count if count else 0.0
            totals[2] += count
            continue
        totals[0] += task_loss(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == y).sum().double()
        totals[2] += y.numel()
    strategy.all_reduce_sum(totals)
    model.train(was_training)
    loss = (totals[0] / totals[2]).item()
    if custom:
        return {"val_loss": loss}
    if task == "lm":
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    return {"val_loss": loss, "val_accuracy": (totals[1] / totals[2]).item()}
