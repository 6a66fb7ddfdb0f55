"""LAMB against the formulas written out here, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bigbatch.optim import lamb_kernel
from bigbatch.optim.lamb import LAMB
from tests.unit.optim_helpers import (DT, NoisyQuadratic, OneThread, assert_mixed_dtypes_agree, make_params,
                                      relative_error)

PROBLEM = NoisyQuadratic(noise_seed=2000)
grads_at, run = PROBLEM.grads_at, PROBLEM.run


def reference_lamb(params, steps, lr, betas, eps, weight_decay, bias_correction=True, trust_clip=None,
                   excluded=(), wd_of=None):
    """Straight per-tensor LAMB from the definition. `excluded`: indices with r = 1."""
    b1, b2 = betas
    ws = [p.detach().clone() for p in params]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for k in range(steps):
        t = k + 1
        gs = grads_at(ws, k)
        for i, (w, g) in enumerate(zip(ws, gs)):
            wd = (wd_of or {}).get(i, weight_decay)
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat = ms[i] / (1 - b1 ** t) if bias_correction else ms[i]
            v_hat = vs[i] / (1 - b2 ** t) if bias_correction else vs[i]
            u = m_hat / (torch.sqrt(v_hat) + eps) + wd * w
            w_norm, u_norm = w.norm().item(), u.norm().item()
            r = 1.0 if (i in excluded or w_norm == 0 or u_norm == 0) else w_norm / u_norm
            if trust_clip is not None and i not in excluded:
                r = min(r, trust_clip)
            ws[i] = w - lr * r * u
    return ws


PATHS = {"native": None, "torch": None, "foreach": True, "loop": False}  # path -> the foreach argument


@pytest.fixture(params=list(PATHS))
def path(request):
    """The `foreach` argument selecting one of LAMB's four code paths, on one torch thread: the default
    path with the C kernel ("native") or with torch ops only ("torch"), multi-tensor, or the loop."""
    with OneThread():
        lamb_kernel.set_enabled(request.param == "native")
        try:
            if request.param == "native" and lamb_kernel.library() is None:
                pytest.fail("the native LAMB kernel did not build (see the warning)")
            yield PATHS[request.param]
        finally:
            lamb_kernel.set_enabled(True)


def test_one_step_matches_formula():
    w0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=DT)
    g = torch.tensor([[0.1, 0.2], [-0.3, 0.05]], dtype=DT)
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.999), 1e-6, 0.01
    w = w0.clone().requires_grad_()
    opt = LAMB([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    w.grad = g.clone()
    opt.step()
    m_hat = (1 - b1) * g / (1 - b1)          # = g on the first step
    v_hat = (1 - b2) * g * g / (1 - b2)      # = g² on the first step
    u = m_hat / (v_hat.sqrt() + eps) + wd * w0  # ≈ sign(g) + wd·w
    r = w0.norm() / u.norm()
    torch.testing.assert_close(w.detach(), w0 - lr * r * u, rtol=1e-14, atol=0)
    assert opt.state[w]["step"] == 1


@pytest.mark.parametrize("bias_correction,trust_clip,wd", [(True, None, 0.01), (True, None, 0.0),
                                                           (False, None, 0.01), (True, 0.5, 0.01)])
def test_twenty_steps_match_reference(path, bias_correction, trust_clip, wd):
    lr, betas, eps = 0.02, (0.9, 0.99), 1e-6
    params = make_params()
    expected = reference_lamb(params, 20, lr, betas, eps, wd, bias_correction, trust_clip)
    opt = LAMB(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, bias_correction=bias_correction,
               trust_clip=trust_clip, foreach=path)
    run(opt, params, 20)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


def test_trust_clip_binds():
    # With a tiny update and large weights the raw ratio is huge; trust_clip caps it.
    w0 = torch.full((4,), 10.0, dtype=DT)
    w = w0.clone().requires_grad_()
    opt = LAMB([w], lr=0.1, weight_decay=0.0, eps=0.0, trust_clip=2.0)
    w.grad = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DT)
    opt.step()
    # u = sign(g) (first step, eps 0): ‖w‖/‖u‖ = 20/2 = 10 → clipped to 2.
    torch.testing.assert_close(w.detach(), w0 - 0.1 * 2.0 * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DT))


def test_foreach_equals_loop():
    a, b = make_params(3), make_params(3)
    kw = dict(lr=0.05, betas=(0.8, 0.95), weight_decay=0.02, trust_clip=3.0)
    run(LAMB(a, foreach=True, **kw), a, 15)
    run(LAMB(b, foreach=False, **kw), b, 15)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def test_zero_initialized_tensor_moves(path):
    # ‖w‖ = 0 → r = 1: the first step is the plain Adam step -lr·m̂/(√v̂+eps) ≈ -lr·sign(g).
    w = torch.zeros(3, dtype=DT, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    opt = LAMB([w], lr=0.1, eps=1e-6, weight_decay=0.01, foreach=path)
    w.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), -0.1 * g / (g.abs() + 1e-6), rtol=1e-14, atol=0)
    # And over 20 steps alongside non-zero tensors it follows the reference.
    params = make_params(5, zero_first=True)
    expected = reference_lamb(params, 20, 0.02, (0.9, 0.999), 1e-6, 0.01)
    run(LAMB(params, lr=0.02, foreach=path), params, 20)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


def test_excluded_group_uses_ratio_one(path):
    params = make_params(7)
    groups = [{"params": [params[0], params[2]]},
              {"params": [params[1]], "weight_decay": 0.0, "exclude_from_adaptation": True}]
    opt = LAMB(groups, lr=0.02, weight_decay=0.01, trust_clip=0.5, foreach=path)
    expected = reference_lamb(params, 20, 0.02, (0.9, 0.999), 1e-6, 0.01, trust_clip=0.5,
                              excluded=(1,), wd_of={1: 0.0})
    run(opt, params, 20)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


def test_excluded_group_matches_torch_adamw():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(6, generator=gen, dtype=DT, requires_grad=True)
    twin = w.detach().clone().requires_grad_()
    opt = LAMB([{"params": [w], "exclude_from_adaptation": True}], lr=0.01, betas=(0.9, 0.99),
               eps=1e-8, weight_decay=0.05)
    adamw = torch.optim.AdamW([twin], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    for _ in range(20):
        g = torch.randn(6, generator=gen, dtype=DT) + w.detach()
        w.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
    torch.testing.assert_close(w, twin, rtol=1e-12, atol=1e-13)


def test_state_dict_round_trip_continues_identically(path):
    kw = dict(lr=0.03, betas=(0.9, 0.99), weight_decay=0.01, trust_clip=5.0, foreach=path)
    params = make_params(2)
    opt = LAMB(params, **kw)
    run(opt, params, 5)
    saved_state = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, 7, first=5)

    resumed = [p.clone().requires_grad_() for p in saved_params]
    opt2 = LAMB(resumed, lr=1.0)  # hyper-parameters come back from the state dict
    opt2.load_state_dict(saved_state)
    assert opt2.state[resumed[0]]["step"] == 5
    run(opt2, resumed, 7, first=5)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_norm_fn_is_used_for_w_and_u():
    # A norm_fn reporting ‖w‖ four times larger (as if three more equal shards lived elsewhere)
    # quadruples the trust ratio: the step is 4× the default one.
    w0 = torch.tensor([1.0, 2.0, -1.0], dtype=DT)
    g = torch.tensor([0.3, -0.2, 0.1], dtype=DT)
    steps = []
    for scale in (1.0, 4.0):
        w = w0.clone().requires_grad_()

        def fake_norms(ts, scale=scale):
            # params first, then updates (foreach bucket layout)
            half = len(ts) // 2
            return torch.stack([t.norm() * (scale if i < half else 1.0) for i, t in enumerate(ts)])

        opt = LAMB([w], lr=0.01, weight_decay=0.0, norm_fn=fake_norms)
        w.grad = g.clone()
        opt.step()
        steps.append(w.detach() - w0)
    torch.testing.assert_close(steps[1], 4.0 * steps[0], rtol=1e-13, atol=0)


def test_bad_arguments():
    w = torch.randn(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="betas"):
        LAMB([w], lr=0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="trust_clip"):
        LAMB([w], lr=0.1, trust_clip=0.0)
    assert math.isclose(LAMB([w], lr=0.1).defaults["eps"], 1e-6)


def _apex_usable() -> bool:
    try:
        import apex.optimizers  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_apex_usable(), reason="apex and CUDA are available: no error to test")
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_apex_impl_unavailable_raises_helpful_error(name):
    from bigbatch.optim.apex_impl import build_apex_optimizer

    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError) as err:
        build_apex_optimizer(name, [w], lr=0.1, weight_decay=0.0)
    msg = str(err.value)
    assert "optim.impl" in msg and "optim.impl: torch" in msg
    assert "github.com/NVIDIA/apex" in msg and "not on PyPI" in msg


def test_apex_impl_rejects_other_optimizers():
    from bigbatch.optim.apex_impl import build_apex_optimizer

    with pytest.raises(ValueError, match="optim.impl"):
        build_apex_optimizer("adamw", [torch.zeros(1, requires_grad=True)], lr=0.1)


def test_mixed_dtypes_in_one_group():
    assert_mixed_dtypes_agree(lambda ps, foreach: LAMB(ps, lr=0.1, weight_decay=0.01, foreach=foreach))


def test_float32_paths_match_previous_implementation_and_float64_reference(path):
    # The bound: every path within 1e-6 (relative, per tensor) of the per-parameter loop, the
    # implementation before the fast paths, after 20 float32 steps; and of the float64 reference.
    params64 = make_params(3)
    expected = reference_lamb(params64, 20, 0.02, (0.9, 0.999), 1e-6, 0.01)
    runs = {}
    for name, foreach in (("previous", False), ("this path", path)):
        params = [p.detach().float().requires_grad_() for p in params64]
        run(LAMB(params, lr=0.02, foreach=foreach), params, 20)
        runs[name] = params
    for p, q, e in zip(runs["this path"], runs["previous"], expected):
        assert p.dtype == torch.float32
        assert relative_error(p, q) < 1e-6
        assert relative_error(p, e) < 1e-6


def test_gradients_laid_out_unlike_params(path):
    # A transposed gradient pairs with the parameter element by index, not by memory position: the
    # fused kernels must not see it (they fall back), and the result is the reference's.
    params = make_params(8)
    expected = reference_lamb(params, 5, 0.02, (0.9, 0.999), 1e-6, 0.01)
    opt = LAMB(params, lr=0.02, foreach=path)
    for k in range(5):
        for p, g in zip(params, grads_at(params, k)):
            p.grad = g.mT.contiguous().mT if g.ndim == 2 else g
        assert params[0].grad.stride() != params[0].stride()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


def test_default_path_runs_the_native_kernel_on_one_thread(monkeypatch):
    calls = []
    real = lamb_kernel.lamb_step
    monkeypatch.setattr(lamb_kernel, "lamb_step", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k)))
    params = make_params(1)
    groups = [{"params": params[:2]}, {"params": params[2:], "exclude_from_adaptation": True}]
    with OneThread():
        run(LAMB(groups, lr=0.02), params, 3)
    assert calls == [2, 2, 2]  # one call per step for the adapted group; the excluded one is fused AdamW
    run(LAMB(params, lr=0.02), params, 1)
    if torch.get_num_threads() > 1:
        assert calls == [2, 2, 2]  # several threads: torch's parallel kernels instead


def test_native_kernel_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BIGBATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(lamb_kernel, "_tried", False)
    monkeypatch.setattr(lamb_kernel, "_library", None)
    params = make_params()
    expected = reference_lamb(params, 3, 0.02, (0.9, 0.999), 1e-6, 0.01)
    with OneThread(), pytest.warns(RuntimeWarning, match="native CPU kernel unavailable.*no-such-compiler"):
        run(LAMB(params, lr=0.02), params, 3)
    assert lamb_kernel.library() is None
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)


def test_native_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BIGBATCH_CACHE_DIR", str(tmp_path))
    lamb_kernel._load()
    built = list((tmp_path / "native").glob("lamb_kernel-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(lamb_kernel, "_compile", lambda *a: pytest.fail("rebuilt a cached library"))
    lamb_kernel._load()
