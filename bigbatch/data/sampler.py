"""A distributed sampler whose position is "global samples consumed".

The data order is a fixed function of (seed, epoch): epoch e visits a permutation of the training set
drawn from a generator seeded with seed + e. The run is one endless stream of those permutations, and
an optimizer step that consumes B samples starting at stream position p takes stream[p : p+B]; rank r
takes its contiguous share of that slice. Because the position is a sample count, not a batch count,
the global batch may change between steps (a batch ramp) and a resumed run continues exactly: no
sample is skipped or repeated.
"""

from __future__ import annotations

import torch


class GlobalSampler:
    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if dataset_size <= 0:
            raise ValueError("the training split is empty")
        self.size, self.seed, self.rank, self.world_size = dataset_size, seed, rank, world_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return self._perm

    def stream(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices at stream positions [start, start + count), crossing epochs as needed."""
        pieces, pos, end = [], start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.size)
            take = min(self.size - offset, end - pos)
            pieces.append(self.permutation(epoch)[offset:offset + take])
            pos += take
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)

    def rank_indices(self, start: int, global_batch: int) -> torch.Tensor:
        """This rank's share of the step that consumes [start, start + global_batch)."""
        per_rank = global_batch // self.world_size
        return self.stream(start + self.rank * per_rank, per_rank)

    def epoch_of(self, samples: int) -> int:
        return samples // self.size

    def state_dict(self) -> dict:
        # The position lives in the trainer's counters; this guards against resuming other data.
        return {"size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(f"checkpoint data order (size {state['size']}, seed {state['seed']}) does not "
                             f"match this run (size {self.size}, seed {self.seed}); use the same data "
                             "and run.seed, or checkpoint.resume: never")
