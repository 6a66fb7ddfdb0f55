"""Our Lion and schedule-free AdamW step by step against the reference packages.

lion-pytorch 0.2.5 (MIT, lucidrains) and Meta's schedulefree 1.4.1 (Apache-2.0, the paper authors'
package) are optional: `pip install 'bigbatch[dev]'` brings them, and without them these tests skip.

Each test trains two copies of one small model (Linear/LayerNorm, biases) on the same batches for 30
steps, ours on one copy and theirs on the other, with the factory's two groups (matrices decayed,
biases and norm weights not) and every knob set away from its default. Both apply the same float
operations in the same order, so the trajectories are equal bit for bit, in float64 and float32;
where they legitimately differ (their foreach Lion's lerp, our exact y restore) the tolerance says
by how much.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bigbatch.optim.factory import param_groups
from bigbatch.optim.lion import Lion
from bigbatch.optim.schedule_free import ScheduleFreeAdamW

STEPS = 30
SF_KNOBS = dict(lr=3e-3, betas=(0.85, 0.995), eps=1e-7, warmup_steps=10)


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).to(dtype)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def trajectory(model: nn.Module, opt: torch.optim.Optimizer, eval_every: int = 0, lr_at=None,
               before_step=None) -> list[torch.Tensor]:
    """The parameters after every step and, every `eval_every` steps, at the eval point (x) too.

    `lr_at(k)`, if given, overwrites each group's LR before step k, as the trainer's schedule does.
    Each run draws the same batches; gradients come from its own model (schedulefree divides p.grad
    in place, so the two runs must not share gradient tensors)."""
    gen = torch.Generator().manual_seed(7)
    dtype = next(model.parameters()).dtype
    snapshots = []
    for k in range(STEPS):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(k)
        x = torch.randn(32, 8, generator=gen, dtype=dtype)
        y = torch.randint(0, 3, (32,), generator=gen)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if before_step is not None:
            before_step()
        opt.step()
        snapshots.append(flat(model))
        if eval_every and (k + 1) % eval_every == 0:
            opt.eval()
            snapshots.append(flat(model))
            opt.train()
    return snapshots


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor], rtol: float = 0.0, atol: float = 0.0):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if rtol == atol == 0.0:
            assert torch.equal(a, b), f"snapshot {k}: max |ours − theirs| = {(a - b).abs().max():.3g}"
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"snapshot {k}")


def row_shards(groups: list[dict]) -> tuple[list[dict], callable]:
    """Each parameter cut into two dim-0 blocks, the way FSDP (zero2/3) hands each rank's optimizer
    its shards: the blocks are Parameters viewing the model's storage, so stepping them updates the
    model. Returns the sharded groups and a function that copies the model's gradients into them."""
    blocks_of, sharded = [], []
    for group in groups:
        blocks = []
        for p in group["params"]:
            mine = [nn.Parameter(rows) for rows in p.detach().chunk(2)]  # views of p's storage
            blocks_of.append((p, mine))
            blocks += mine
        sharded.append({**group, "params": blocks})

    def pull_grads():
        for p, blocks in blocks_of:
            for block, rows in zip(blocks, p.grad.chunk(2)):
                block.grad = rows.clone()

    return sharded, pull_grads


# ----------------------------------------------------------------------------------------- Lion

@pytest.fixture
def lion_pytorch():
    return pytest.importorskip("lion_pytorch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("betas", [(0.9, 0.99), (0.99, 0.8)])  # swapped too: the order is β1, β2
def test_lion_equals_lion_pytorch(lion_pytorch, dtype, betas):
    # Both: c = β1·m + (1−β1)·g; w ← w·(1 − lr·λ); w ← w − lr·sign(c); m ← β2·m + (1−β2)·g.
    # lion-pytorch's default (decoupled_weight_decay=False) multiplies λ by the current lr, as ours.
    runs = []
    for cls in (Lion, lion_pytorch.Lion):
        model = make_model(dtype)
        runs.append(trajectory(model, cls(param_groups(model, 0.5, False), lr=1e-3, betas=betas)))
    assert_same(*runs)


def test_lion_equals_lion_pytorch_foreach_up_to_rounding(lion_pytorch):
    # Its foreach variant updates m with lerp, a different rounding of the same average.
    from lion_pytorch.foreach import Lion as ForeachLion

    runs = []
    for cls in (Lion, ForeachLion):
        model = make_model(torch.float32)
        runs.append(trajectory(model, cls(param_groups(model, 0.5, False), lr=1e-3, betas=(0.9, 0.99))))
    assert_same(*runs, rtol=1e-6, atol=1e-6)


def test_lion_on_row_shards_equals_lion_pytorch_on_whole_tensors(lion_pytorch):
    ours_model, theirs_model = make_model(torch.float64), make_model(torch.float64)
    groups, pull_grads = row_shards(param_groups(ours_model, 0.5, False))
    ours = trajectory(ours_model, Lion(groups, lr=1e-3), before_step=pull_grads)
    theirs = trajectory(theirs_model, lion_pytorch.Lion(param_groups(theirs_model, 0.5, False), lr=1e-3))
    assert_same(ours, theirs)


# ------------------------------------------------------------------------------ schedule-free

@pytest.fixture
def schedulefree():
    return pytest.importorskip("schedulefree")


def run_schedule_free(cls, dtype, lr_at=None, **kwargs) -> list[torch.Tensor]:
    model = make_model(dtype)
    opt = cls(param_groups(model, 0.1, False), **SF_KNOBS, **kwargs)
    opt.train()  # theirs starts in eval mode and refuses to step; ours starts in train mode (no-op)
    return trajectory(model, opt, eval_every=7, lr_at=lr_at)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("r, weight_lr_power", [(0.0, 2.0), (0.5, 1.0)])
def test_schedule_free_equals_schedulefree(schedulefree, dtype, foreach, r, weight_lr_power):
    # Same sequence (linear warmup of γ, bias-corrected v in the denominator, decay λ·y added to ĝ,
    # averaging weight (k+1)^r·max γ^power), same in-place y update, same eval lerp, with the train
    # lerp back (exact_restore=False): equal after every step and at every eval point.
    knobs = dict(r=r, weight_lr_power=weight_lr_power)
    ours = run_schedule_free(ScheduleFreeAdamW, dtype, exact_restore=False, **knobs)
    theirs = run_schedule_free(schedulefree.AdamWScheduleFree, dtype, foreach=foreach, **knobs)
    assert_same(ours, theirs)


def test_schedule_free_external_lr_changes_equal_schedulefree(schedulefree):
    # The trainer overwrites group['lr'] before each step: both weight the average by the largest
    # scheduled LR so far, so a rise then a drop gives the same trajectory.
    def lr_at(k: int) -> float:
        return 2e-3 * (1 + k) if k < 15 else 1e-3

    ours = run_schedule_free(ScheduleFreeAdamW, torch.float64, lr_at, exact_restore=False)
    theirs = run_schedule_free(schedulefree.AdamWScheduleFree, torch.float64, lr_at)
    assert_same(ours, theirs)


def test_schedule_free_exact_restore_differs_from_schedulefree_by_rounding_only(schedulefree):
    # Ours (the default) puts y back from a copy after eval; theirs recomputes it with a lerp, which
    # rounds (~1 ulp per switch, measured 7e-9 in float32 here).
    ours = run_schedule_free(ScheduleFreeAdamW, torch.float32, exact_restore=True)
    theirs = run_schedule_free(schedulefree.AdamWScheduleFree, torch.float32)
    assert_same(ours, theirs, rtol=1e-6, atol=1e-6)


def test_schedule_free_on_row_shards_equals_schedulefree_on_whole_tensors(schedulefree):
    ours_model = make_model(torch.float64)
    groups, pull_grads = row_shards(param_groups(ours_model, 0.1, False))
    ours_opt = ScheduleFreeAdamW(groups, **SF_KNOBS, exact_restore=False)
    ours = trajectory(ours_model, ours_opt, eval_every=7, before_step=pull_grads)
    theirs = run_schedule_free(schedulefree.AdamWScheduleFree, torch.float64)
    assert_same(ours, theirs)


def test_schedule_free_paper_variant_is_not_ours(schedulefree):
    # AdamWScheduleFreePaper (the published runs) scales γ by √(1−β2^t) instead of bias-correcting v,
    # which also changes the averaging weights; the package's default, and ours, is AdamWScheduleFree.
    ours = run_schedule_free(ScheduleFreeAdamW, torch.float64, exact_restore=False)
    paper = run_schedule_free(schedulefree.AdamWScheduleFreePaper, torch.float64)
    assert not torch.allclose(ours[0], paper[0], rtol=1e-6, atol=0)
