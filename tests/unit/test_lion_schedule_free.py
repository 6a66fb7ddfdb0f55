"""Lion and schedule-free AdamW against straightforward re-derivations, in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from bigbatch.optim.lion import Lion
from bigbatch.optim.schedule_free import ScheduleFreeAdamW
from tests.unit.optim_helpers import DT, NoisyQuadratic, make_params

PROBLEM = NoisyQuadratic(noise_seed=3000)
grads_at, run = PROBLEM.grads_at, PROBLEM.run


# ----------------------------------------------------------------------------------------- Lion

def reference_lion(params, steps, lr, betas, wd):
    b1, b2 = betas
    ws = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    for k in range(steps):
        gs = grads_at(ws, k)
        for i, (w, g) in enumerate(zip(ws, gs)):
            c = b1 * ms[i] + (1 - b1) * g
            ws[i] = w - lr * wd * w - lr * torch.sign(c)
            ms[i] = b2 * ms[i] + (1 - b2) * g
    return ws


def test_lion_one_step_formula():
    w0 = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=DT)
    g = torch.tensor([0.3, 0.2, -0.1, 0.0], dtype=DT)
    lr, wd, b2 = 0.01, 0.1, 0.99
    w = w0.clone().requires_grad_()
    opt = Lion([w], lr=lr, betas=(0.9, b2), weight_decay=wd)
    w.grad = g.clone()
    opt.step()
    # m = 0 → c = (1−β1)·g, sign(c) = sign(g) (sign(0) = 0); decay w·(1 − lr·wd).
    expected = w0 * (1 - lr * wd) - lr * torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=DT)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(opt.state[w]["exp_avg"], (1 - b2) * g, rtol=1e-15, atol=0)


def test_lion_twenty_steps_match_reference():
    params = make_params()
    expected = reference_lion(params, 20, 3e-3, (0.9, 0.99), 0.5)
    run(Lion(params, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5), params, 20)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-13, atol=1e-14)


def test_lion_state_dict_round_trip():
    params = make_params(1)
    opt = Lion(params, lr=1e-2, weight_decay=0.1)
    run(opt, params, 4)
    saved, saved_params = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    run(opt, params, 6, first=4)
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = Lion(resumed)
    opt2.load_state_dict(saved)
    run(opt2, resumed, 6, first=4)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------ schedule-free

def reference_schedule_free(params, steps, lrs, betas, eps, wd, warmup, r, power):
    """The paper's three sequences, kept explicitly: returns (x, y, z) after `steps` steps.

    lrs[k] is the group LR at step k (the trainer may change it between steps).
    """
    b1, b2 = betas
    xs = [p.detach().clone() for p in params]
    zs = [p.detach().clone() for p in params]
    vs = [torch.zeros_like(x) for x in xs]
    weight_sum, lr_max = 0.0, -1.0
    for k in range(steps):
        gamma = lrs[k] * (min(1.0, (k + 1) / warmup) if warmup else 1.0)
        lr_max = max(lr_max, gamma)
        weight = (k + 1) ** r * lr_max ** power
        weight_sum += weight
        c = weight / weight_sum
        ys = [(1 - b1) * z + b1 * x for x, z in zip(xs, zs)]
        gs = grads_at(ys, k)
        for i, g in enumerate(gs):
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            v_hat = vs[i] / (1 - b2 ** (k + 1))
            g_hat = g / (torch.sqrt(v_hat) + eps) + wd * ys[i]
            zs[i] = zs[i] - gamma * g_hat
            xs[i] = (1 - c) * xs[i] + c * zs[i]
    ys = [(1 - b1) * z + b1 * x for x, z in zip(xs, zs)]
    return xs, ys, zs


SF_KW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup_steps=5, r=0.5, weight_lr_power=2.0)


def test_schedule_free_matches_three_sequence_reference():
    params = make_params(2)
    lrs = [0.01] * 20
    xs, ys, zs = reference_schedule_free(params, 20, lrs, SF_KW["betas"], SF_KW["eps"],
                                         SF_KW["weight_decay"], SF_KW["warmup_steps"], SF_KW["r"],
                                         SF_KW["weight_lr_power"])
    opt = ScheduleFreeAdamW(params, lr=0.01, **SF_KW)
    run(opt, params, 20)
    for p, y, z in zip(params, ys, zs):  # train mode: parameters hold y
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["z"], z, rtol=1e-12, atol=1e-13)
    opt.eval()  # eval mode: parameters hold x
    for p, x in zip(params, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)


def test_schedule_free_external_lr_changes_use_lr_max():
    # The trainer overwrites group['lr'] (here: its own warmup then a drop); weights use max LR so far.
    params = make_params(3)
    lrs = [0.002 * (k + 1) for k in range(10)] + [0.005] * 10
    kw = dict(SF_KW, warmup_steps=0)
    xs, _, _ = reference_schedule_free(params, 20, lrs, kw["betas"], kw["eps"], kw["weight_decay"], 0,
                                       kw["r"], kw["weight_lr_power"])
    opt = ScheduleFreeAdamW(params, lr=lrs[0], **kw)
    for k in range(20):
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        run(opt, params, 1, first=k)
    assert opt.param_groups[0]["lr_max"] == pytest.approx(0.02)
    opt.eval()
    for p, x in zip(params, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)


def test_eval_then_train_restores_parameters_exactly():
    params = make_params(4)
    opt = ScheduleFreeAdamW(params, lr=0.01, **SF_KW)
    run(opt, params, 7)
    before = [p.detach().clone() for p in params]
    opt.eval()
    assert opt.train_mode is False and opt.param_groups[0]["train_mode"] is False
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # x differs from y
    opt.eval()  # idempotent
    opt.train()
    assert opt.train_mode is True
    for p, b in zip(params, before):
        assert torch.equal(p, b)  # bit for bit
        assert "y" not in opt.state[p]
    opt.train()  # idempotent
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_eval_then_train_without_copy_is_equal_up_to_rounding():
    params = make_params(4)
    opt = ScheduleFreeAdamW(params, lr=0.01, exact_restore=False, **SF_KW)
    run(opt, params, 7)
    before = [p.detach().clone() for p in params]
    opt.eval()
    assert all("y" not in opt.state[p] for p in params)
    opt.train()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=1e-14, atol=1e-15)


def test_step_in_eval_mode_raises_and_eval_before_first_step_is_noop():
    params = make_params(5)
    start = [p.detach().clone() for p in params]
    opt = ScheduleFreeAdamW(params, lr=0.01)
    opt.eval()  # no z yet: x = y = z = initial parameters
    for p, s in zip(params, start):
        assert torch.equal(p, s)
    for p, g in zip(params, grads_at(params, 0)):
        p.grad = g
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    opt.step()


@pytest.mark.parametrize("exact_restore", [True, False])
def test_checkpoint_in_eval_mode_then_resume(exact_restore):
    """eval() → save (model holds x) → train() → continue; a fresh optimizer loaded from the
    checkpoint, then train(), continues identically (bitwise with exact_restore)."""
    params = make_params(6)
    opt = ScheduleFreeAdamW(params, lr=0.01, exact_restore=exact_restore, **SF_KW)
    run(opt, params, 6)
    opt.eval()
    saved_params = [p.detach().clone() for p in params]  # x, what the checkpoint ships
    saved_state = copy.deepcopy(opt.state_dict())
    assert saved_state["param_groups"][0]["train_mode"] is False
    opt.train()
    run(opt, params, 8, first=6)

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = ScheduleFreeAdamW(resumed, lr=1.0, exact_restore=exact_restore)
    opt2.load_state_dict(saved_state)
    assert opt2.train_mode is False and opt2.param_groups[0]["k"] == 6
    opt2.train()
    run(opt2, resumed, 8, first=6)
    for p, q in zip(params, resumed):
        if exact_restore:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_checkpoint_in_train_mode_round_trip():
    params = make_params(8)
    opt = ScheduleFreeAdamW(params, lr=0.01, **SF_KW)
    run(opt, params, 5)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    run(opt, params, 5, first=5)
    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = ScheduleFreeAdamW(resumed)
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, 5, first=5)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
