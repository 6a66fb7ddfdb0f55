"""Held-out evaluation, sharded over the ranks and reduced: accuracy, or loss and perplexity."""

from __future__ import annotations

import math

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


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, task: str, strategy, rank: int, world_size: int,
             batch_size: int, max_batches: int | None, device: torch.device, autocast) -> dict:
    """Each rank evaluates every world_size-th sample; sums are all-reduced, so any world size agrees."""
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
        logits, y = logits[keep], y[keep]
        totals[0] += task_loss(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == y).sum().double()
        totals[2] += y.numel()
    strategy.all_reduce_sum(totals)
    model.train(was_training)
    loss = (totals[0] / totals[2]).item()
    if task == "lm":
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    return {"val_loss": loss, "val_accuracy": (totals[1] / totals[2]).item()}
