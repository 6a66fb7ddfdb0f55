"""The shape of a Slurm job, computed in one place: nodes x ranks per node, who is who, who gets what.

Ranks per node default to one per GPU (`slurm.gpus_per_node`), else 1. Global ranks are numbered
node-major, as srun's block distribution and torchrun's node ranks both do: node n, local rank l is
global rank n * ranks_per_node + l. Each rank uses `cuda:LOCAL_RANK` (see bigbatch.launch.runtime):
every rank sees all of its node's GPUs, so NCCL can use P2P/NVLink between them; Slurm's
`--gpu-bind`/`--gpus-per-task` would hide the other GPUs from each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.config import Config, SlurmConfig, split_batch

# Beyond this many ranks the dry run's rank map shows the first two nodes and the last one.
FULL_MAP_RANKS = 64


def ranks_per_node(slurm: SlurmConfig) -> int:
    """slurm.ntasks_per_node, defaulting to one rank per GPU (1 without GPUs)."""
    if slurm.ntasks_per_node is not None:
        return slurm.ntasks_per_node
    return slurm.gpus_per_node or 1


def shape_problems(slurm: SlurmConfig) -> list[str]:
    """An explicit ntasks_per_node must match gpus_per_node: one rank per GPU."""
    ntasks, gpus = slurm.ntasks_per_node, slurm.gpus_per_node
    if ntasks is not None and gpus > 0 and ntasks != gpus:
        return [f"slurm.ntasks_per_node={ntasks} disagrees with slurm.gpus_per_node={gpus}: bigbatch "
                f"runs one rank per GPU; remove slurm.ntasks_per_node (it follows gpus_per_node) or "
                f"set both to the same number"]
    return []


@dataclass(frozen=True)
class RankSlot:
    node: int
    local_rank: int
    rank: int
    device: str


@dataclass(frozen=True)
class JobShape:
    nodes: int
    ranks_per_node: int
    gpus_per_node: int

    @classmethod
    def of(cls, slurm: SlurmConfig) -> "JobShape":
        return cls(slurm.nodes, ranks_per_node(slurm), slurm.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def slot(self, node: int, local_rank: int) -> RankSlot:
        device = f"cuda:{local_rank}" if self.gpus_per_node else "cpu"
        return RankSlot(node, local_rank, node * self.ranks_per_node + local_rank, device)

    def slots(self) -> list[RankSlot]:
        return [self.slot(n, l) for n in range(self.nodes) for l in range(self.ranks_per_node)]


@dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    per_rank: int
    micro_batch: int
    accumulation: int


def batch_split(cfg: Config, shape: JobShape) -> BatchSplit:
    """How batch.global_batch splits over the job's ranks (ValueError if it does not)."""
    micro, accumulation = split_batch(cfg.batch.global_batch, shape.world_size, cfg.batch.micro_batch)
    return BatchSplit(cfg.batch.global_batch, micro * accumulation, micro, accumulation)


def rank_map(cfg: Config) -> str:
    """The dry run's table: node x local rank -> global rank, device, per-rank batch."""
    shape = JobShape.of(cfg.slurm)
    split = batch_split(cfg, shape)
    lines = [f"rank map: {shape.nodes} node(s) x {shape.ranks_per_node} rank(s) = {shape.world_size} "
             f"ranks ({cfg.slurm.launch_mode} launch); global batch {split.global_batch} = "
             f"{split.per_rank} per rank = micro-batch {split.micro_batch} x {split.accumulation} "
             "accumulation step(s)",
             f"{'node':>6} {'local rank':>10} {'global rank':>11}  {'device':<8} {'batch':>6}"]
    shown = _shown_nodes(shape)
    for node in range(shape.nodes):
        if node not in shown:
            if node == shown[-2] + 1:
                lines.append(f"{'...':>6}  (nodes {node}-{shape.nodes - 2} follow the same pattern)")
            continue
        for local in range(shape.ranks_per_node):
            slot = shape.slot(node, local)
            lines.append(f"{slot.node:>6} {slot.local_rank:>10} {slot.rank:>11}  {slot.device:<8} "
                         f"{split.per_rank:>6}")
    return "\n".join(lines)


def _shown_nodes(shape: JobShape) -> list[int]:
    if shape.world_size <= FULL_MAP_RANKS or shape.nodes <= 3:
        return list(range(shape.nodes))
    return [0, 1, shape.nodes - 1]
