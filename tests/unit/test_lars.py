"""LARS / LARC against the formulas written out here, in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from bigbatch.optim.lars import LARS
from tests.unit.optim_helpers import (DT, NoisyQuadratic, OneThread, assert_mixed_dtypes_agree, make_params,
                                      relative_error)

PROBLEM = NoisyQuadratic(noise_seed=1000)
grads_at, run = PROBLEM.grads_at, PROBLEM.run
# None: the default path (tensor at a time on CPU); True: multi-tensor; False: the per-parameter loop
FOREACH = [None, True, False]


def reference_lars(params, steps, lr, momentum, weight_decay, tc, eps, nesterov, clip, excluded=(),
                   wd_of=None):
    """Straight per-tensor LARS from the definition (no in-place tricks, no foreach).

    `excluded`: indices with local_lr = 1; `wd_of`: {index: weight decay} overrides.
    """
    ws = [p.detach().clone() for p in params]
    bufs = [None] * len(ws)
    for k in range(steps):
        gs = grads_at(ws, k)
        for i, (w, g) in enumerate(zip(ws, gs)):
            wd = (wd_of or {}).get(i, weight_decay)
            w_norm, g_norm = w.norm().item(), g.norm().item()
            if i in excluded or w_norm == 0 or g_norm == 0:
                local = 1.0
            else:
                local = tc * w_norm / (g_norm + wd * w_norm + eps)
                if clip:
                    local = min(local / lr, 1.0)
            d = local * (g + wd * w)
            bufs[i] = d if bufs[i] is None else momentum * bufs[i] + d
            u = d + momentum * bufs[i] if nesterov else bufs[i]
            ws[i] = w - lr * u
    return ws


def test_one_step_matches_formula():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=DT, requires_grad=True)
    g = torch.tensor([[0.1, 0.2], [-0.3, 0.05]], dtype=DT)
    lr, wd, tc, eps = 0.5, 1e-2, 0.02, 1e-8
    opt = LARS([w], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=tc, eps=eps)
    w0 = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    local = tc * w0.norm() / (g.norm() + wd * w0.norm() + eps)
    expected = w0 - lr * local * (g + wd * w0)  # first step: buf = local·(g + wd·w)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], local * (g + wd * w0), rtol=1e-14, atol=0)


def test_one_step_nesterov_and_clip_formula():
    w = torch.tensor([3.0, 4.0], dtype=DT, requires_grad=True)  # ‖w‖ = 5
    g = torch.tensor([0.0, 1.0], dtype=DT)                      # ‖g‖ = 1
    lr, mu, tc = 0.1, 0.9, 0.01
    opt = LARS([w], lr=lr, momentum=mu, trust_coefficient=tc, eps=0.0, nesterov=True, clip=True)
    w.grad = g.clone()
    opt.step()
    local = min(tc * 5.0 / 1.0 / lr, 1.0)  # 0.05 / 0.1 = 0.5
    assert local == pytest.approx(0.5)
    d = local * g
    expected = torch.tensor([3.0, 4.0], dtype=DT) - lr * (d + mu * d)  # nesterov, buf = d
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=0)


def test_clip_caps_local_lr_at_one():
    w = torch.tensor([3.0, 4.0], dtype=DT, requires_grad=True)
    g = torch.tensor([0.0, 1.0], dtype=DT)
    # tc·‖w‖/‖g‖ = 5 → 5/lr = 50 > 1 → clipped to 1: plain SGD step.
    opt = LARS([w], lr=0.1, momentum=0.0, trust_coefficient=1.0, eps=0.0, clip=True)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 3.9], dtype=DT), rtol=1e-14, atol=0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov,clip,wd", [(False, False, 0.0), (False, False, 1e-3),
                                              (True, False, 1e-3), (False, True, 5e-4)])
def test_twenty_steps_match_reference(foreach, nesterov, clip, wd):
    lr, mu, tc, eps = 0.7, 0.9, 0.01, 1e-9
    params = make_params()
    expected = reference_lars(params, 20, lr, mu, wd, tc, eps, nesterov, clip)
    opt = LARS(params, lr=lr, momentum=mu, weight_decay=wd, trust_coefficient=tc, eps=eps,
               nesterov=nesterov, clip=clip, foreach=foreach)
    run(opt, params, 20)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("nesterov", [False, True])
def test_foreach_equals_loop(nesterov):
    a, b = make_params(3), make_params(3)
    kw = dict(lr=0.3, momentum=0.8, weight_decay=1e-2, trust_coefficient=0.02, nesterov=nesterov)
    run(LARS(a, foreach=True, **kw), a, 15)
    run(LARS(b, foreach=False, **kw), b, 15)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_initialized_tensor_moves_like_sgd(foreach):
    # ‖w‖ = 0 → local_lr = 1, so the first step is plain SGD: w = 0 - lr·g.
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=foreach)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), -0.1 * g, rtol=1e-15, atol=0)
    # Zero gradient with nonzero w: local_lr = 1, so only the decay term acts: w -= lr·wd·w.
    v = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
    opt = LARS([v], lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=foreach)
    v.grad = torch.zeros(2, dtype=DT)
    opt.step()
    torch.testing.assert_close(v.detach(), torch.tensor([1.0, 2.0], dtype=DT) * (1 - 0.1 * 1e-2))


@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_init_in_twenty_step_reference(foreach):
    params = make_params(5, zero_first=True)
    expected = reference_lars(params, 20, 0.5, 0.9, 1e-3, 0.01, 1e-9, False, False)
    opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-9,
               foreach=foreach)
    run(opt, params, 20)
    assert params[0].detach().abs().sum() > 0
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("foreach", FOREACH)
def test_excluded_group_uses_local_lr_one(foreach):
    # The vector (index 1) sits in an excluded group with its own weight_decay 0: local_lr = 1 for it,
    # the others keep the trust ratio and the default weight decay.
    params = make_params(7)
    groups = [{"params": [params[0], params[2]]},
              {"params": [params[1]], "weight_decay": 0.0, "exclude_from_adaptation": True}]
    opt = LARS(groups, lr=0.2, momentum=0.9, weight_decay=1e-2, foreach=foreach)
    expected = reference_lars(params, 20, 0.2, 0.9, 1e-2, 0.001, 1e-8, False, False, excluded=(1,),
                              wd_of={1: 0.0})
    run(opt, params, 20)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


def test_excluded_group_matches_torch_sgd():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(6, generator=gen, dtype=DT, requires_grad=True)
    twin = w.detach().clone().requires_grad_()
    opt = LARS([{"params": [w], "exclude_from_adaptation": True, "weight_decay": 1e-2}],
               lr=0.05, momentum=0.9, nesterov=True)
    sgd = torch.optim.SGD([twin], lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    for k in range(20):
        g = torch.randn(6, generator=gen, dtype=DT) + w.detach()
        w.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    torch.testing.assert_close(w, twin, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("foreach", FOREACH)
def test_state_dict_round_trip_continues_identically(foreach):
    kw = dict(lr=0.4, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, nesterov=True,
              foreach=foreach)
    params = make_params(2)
    opt = LARS(params, **kw)
    run(opt, params, 5)
    saved_state = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, 7, first=5)

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = LARS(resumed, lr=1.0)  # hyper-parameters come back from the state dict
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, 7, first=5)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("foreach", FOREACH)
def test_norm_fn_hook_gives_whole_tensor_trust_ratio(foreach):
    """Shard a tensor in two; a norm_fn returning whole-tensor norms reproduces unsharded LARS."""
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(10, generator=gen, dtype=DT)
    whole = full.clone().requires_grad_()
    shards = [full[:6].clone().requires_grad_(), full[6:].clone().requires_grad_()]
    owner: dict[int, tuple[str, int]] = {}
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, foreach=foreach)

    snapshot: dict[str, torch.Tensor] = {}

    def sharded_norms(tensors):
        # What an all-reduce of squared shard norms returns: whole-tensor norms taken before any
        # rank updates its shard (the collective synchronises the ranks).
        return torch.stack([snapshot[owner[id(t)][0]] for t in tensors])

    calls = []

    def recording(tensors):
        calls.append(len(tensors))
        return sharded_norms(tensors)

    opts = [LARS([s], norm_fn=recording, **kw) for s in shards]
    ref = LARS([whole], **kw)
    for k in range(10):
        g = torch.randn(10, generator=gen, dtype=DT) + whole.detach()
        whole.grad = g.clone()
        for i, s in enumerate(shards):  # the same gradient, split like the parameter
            s.grad = g[:6].clone() if i == 0 else g[6:].clone()
            owner[id(s)] = ("param", i)
            owner[id(s.grad)] = ("grad", i)
        snapshot.update(param=whole.detach().norm(), grad=g.norm())
        for o in opts:
            o.step()
        ref.step()
        torch.testing.assert_close(torch.cat([s.detach() for s in shards]), whole.detach(),
                                   rtol=1e-13, atol=1e-14)
    assert calls and all(c == 2 for c in calls)  # [w, g] per tensor (one tensor per optimizer here)


@pytest.mark.parametrize("foreach,expected_calls", [(None, [6]), (True, [6]), (False, [2, 2, 2])])
def test_norm_fn_call_pattern(foreach, expected_calls):
    # default and foreach: one call with params + grads of the bucket; loop: [w, g] per tensor.
    params = make_params(1)
    calls = []
    opt = LARS(params, lr=0.1, foreach=foreach,
               norm_fn=lambda ts: (calls.append(len(ts)), torch.stack([t.norm() for t in ts]))[1])
    run(opt, params, 1)
    assert calls == expected_calls


def test_set_norm_fn_and_grad_none_skipped():
    a = torch.ones(3, dtype=DT, requires_grad=True)
    b = torch.ones(2, dtype=DT, requires_grad=True)
    opt = LARS([a, b], lr=0.1)
    seen = []
    opt.set_norm_fn(lambda ts: (seen.append(len(ts)), torch.stack([t.norm() for t in ts]))[1])
    a.grad = torch.ones(3, dtype=DT)
    opt.step()
    assert seen == [2]
    assert torch.equal(b.detach(), torch.ones(2, dtype=DT)) and len(opt.state[b]) == 0


def test_float32_and_bad_arguments():
    w = torch.randn(5, requires_grad=True)
    w.grad = torch.randn(5)
    LARS([w], lr=0.1).step()
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match="momentum"):
        LARS([w], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        LARS([w], lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([w], lr=0.1, trust_coefficient=0.0)


def test_mixed_dtypes_in_one_group():
    assert_mixed_dtypes_agree(lambda ps, foreach: LARS(ps, lr=0.1, weight_decay=0.01, foreach=foreach))


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("nesterov,wd", [(False, 0.0), (True, 1e-3)])
def test_float32_paths_match_previous_implementation_and_float64_reference(foreach, nesterov, wd):
    # The bound: within 1e-6 (relative, per tensor) of the per-parameter loop, the
    # implementation before the fast paths, after 20 float32 steps; and of the float64 reference.
    kw = dict(lr=0.7, momentum=0.9, weight_decay=wd, trust_coefficient=0.01, eps=1e-9, nesterov=nesterov)
    params64 = make_params(3)
    expected = reference_lars(params64, 20, 0.7, 0.9, wd, 0.01, 1e-9, nesterov, False)
    runs = {}
    with OneThread():
        for name, mode in (("previous", False), ("this path", foreach)):
            params = [p.detach().float().requires_grad_() for p in params64]
            run(LARS(params, foreach=mode, **kw), params, 20)
            runs[name] = params
    for p, q, e in zip(runs["this path"], runs["previous"], expected):
        assert p.dtype == torch.float32
        assert relative_error(p, q) < 1e-6
        assert relative_error(p, e) < 1e-6
