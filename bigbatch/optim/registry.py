"""Optimizers by name: what each one is, for everyone who needs to know before it exists.

A registration is torch-free, so config validation, the memory planner and the sharding rules read it
without importing torch; the builder (`module:function`, called as `build(param_groups, optim_cfg)`)
is imported only when a run builds its optimizer. Adding an optimizer is one file holding the
optimizer and its `build` function, plus one `register_optimizer` line below.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.registry import Registry, import_attribute


@dataclass(frozen=True)
class OptimizerSpec:
    build: str                        # "package.module:function": (param_groups, OptimConfig) -> Optimizer
    state_bytes: int                  # fp32 optimizer state per parameter (the planner's figure)
    momentum_bytes: int = 0           # extra state per parameter when optim.momentum > 0
    uses_momentum: bool = False       # reads optim.momentum / optim.nesterov
    trust_ratio: bool = False         # per-tensor norms: needs whole tensors, not flat partitions
    swaps_eval_weights: bool = False  # evaluates at other weights than it trains (schedule-free)
    groups: str | None = None         # "module:function" (model, weight_decay, decay_norm_and_bias) ->
                                      # param groups, instead of the factory's matrices/vectors split
    hidden_matrix_state_bytes: int | None = None  # state per parameter of hidden matrices, when it
                                                  # differs from state_bytes (muon: 4, the rest 8)
    whole_matrices: bool = False      # orthogonalizes whole matrices (gathers FSDP shards; no DeepSpeed)
    package: str | None = None        # a pip package the builder imports (an optional extra), checked
                                      # before the run starts
    strategies: tuple[str, ...] | None = None  # distributed.strategy values it runs under (None: all)

    def builder(self):
        return import_attribute(self.build)

    def state_bytes_per_param(self, momentum: float) -> int:
        return self.state_bytes + (self.momentum_bytes if momentum > 0 else 0)


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optim.name", "optimizer")
register_optimizer = OPTIMIZERS.register


def optimizer_spec(name: str) -> OptimizerSpec:
    return OPTIMIZERS.get(name)


_F = "bigbatch.optim.factory"
# torch's own: sgd keeps a momentum buffer only with momentum; rmsprop a square average (+ momentum)
register_optimizer("sgd", OptimizerSpec(f"{_F}:build_sgd", 0, momentum_bytes=4, uses_momentum=True))
register_optimizer("adam", OptimizerSpec(f"{_F}:build_adam", 8))        # exp_avg, exp_avg_sq
register_optimizer("adamw", OptimizerSpec(f"{_F}:build_adamw", 8))
register_optimizer("adagrad", OptimizerSpec(f"{_F}:build_adagrad", 4))  # sum of squares
register_optimizer("rmsprop", OptimizerSpec(f"{_F}:build_rmsprop", 4, momentum_bytes=4, uses_momentum=True))
# ours (bigbatch/optim/lars.py, lamb.py, lion.py, schedule_free.py)
register_optimizer("lars", OptimizerSpec(f"{_F}:build_lars", 4, uses_momentum=True, trust_ratio=True))
register_optimizer("lamb", OptimizerSpec(f"{_F}:build_lamb", 8, trust_ratio=True))
register_optimizer("lion", OptimizerSpec(f"{_F}:build_lion", 4))  # one moment
register_optimizer("schedule_free_adamw",  # z and exp_avg_sq (y exists only in eval mode)
                   OptimizerSpec(f"{_F}:build_schedule_free_adamw", 8, swaps_eval_weights=True))
# muon.py: a momentum buffer per hidden-matrix parameter, AdamW's two moments for the rest
register_optimizer("muon", OptimizerSpec(f"{_F}:build_muon", 8, hidden_matrix_state_bytes=4, uses_momentum=True,
                                         groups="bigbatch.optim.muon:muon_param_groups", whole_matrices=True))
# heavyball's SOAP (optional extra `soap`): Adam's two moments in the eigenbasis of Shampoo's Kronecker
# factors; an m x n matrix also keeps both factors and both eigenbases, 8 (m² + n²) bytes: 16 B/param
# more when square, counted as 24 B/param for every tensor (over for vectors, under for skinny
# matrices). Its per-matrix preconditioners need whole tensors: zero1 (whole parameters per rank) runs
# it; FSDP's and DeepSpeed's shards would cut the matrices.
register_optimizer("soap", OptimizerSpec(f"{_F}:build_soap", 24, package="heavyball",
                                         strategies=("ddp", "zero1", "diloco")))
