"""Muon against independent float64 re-derivations: Newton–Schulz through the SVD, a whole step
(Muon matrices and AdamW parameters), parameter roles, planner bytes and the config rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bigbatch.cli import main
from bigbatch.config import ConfigError
from bigbatch.memory.planner import GPTSpec, MeasuredSpec, model_optimizer_bytes, plan, format_plan
from bigbatch.models.gpt import GPT
from bigbatch.models.mlp import MLP
from bigbatch.models.resnet import ResNet
from bigbatch.optim.factory import build_optimizer
from bigbatch.optim.muon import Muon, hidden_matrix_params, muon_param_groups, newton_schulz
from bigbatch.validate import load_config
from tests.conftest import tiny_config, write_config
from tests.unit.optim_helpers import DT, NoisyQuadratic

PROBLEM = NoisyQuadratic(noise_seed=4000)
A, B, C = 3.4445, -4.7750, 2.0315


def spectral_ns(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """NS₅ the other way round: X = U·S·Vᵀ, and an odd matrix polynomial maps each singular value s
    to p(s) = a·s + b·s³ + c·s⁵ (since (X·Xᵀ)ᵏ·X = U·S^(2k+1)·Vᵀ), so NS₅(G) = U·p⁵(S/‖G‖_F)·Vᵀ."""
    g = g.double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s = s / (torch.linalg.matrix_norm(g) + 1e-7)
    for _ in range(steps):
        s = A * s + B * s ** 3 + C * s ** 5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)], ids=["tall", "wide", "square"])
def test_newton_schulz_matches_the_spectral_float64_formula(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(newton_schulz(g), spectral_ns(g), rtol=0, atol=1e-12)
    torch.testing.assert_close(newton_schulz(g, steps=2), spectral_ns(g, steps=2), rtol=0, atol=1e-12)
    # float32 input: computed in float32, within float32 rounding of the float64 answer
    out = newton_schulz(g.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), spectral_ns(g), rtol=0, atol=2e-5)


def test_orthogonalization_puts_singular_values_in_the_quintic_band():
    # p⁵ maps every s/‖G‖_F ≥ 0.0016 into [0.6818, 1.2024] (p's invariant band is [0.6818, 1.1344];
    # 1.2024 is p's maximum on [0, 1]); smaller ones are not lifted that far in 5 steps.
    for shape in [(64, 32), (32, 64), (48, 48)]:
        g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        g[:, 0] *= 30  # an ill-conditioned direction
        raw = torch.linalg.svdvals(g)
        assert raw.max() / raw.min() > 10
        s = torch.linalg.svdvals(newton_schulz(g))
        relative = raw / torch.linalg.matrix_norm(g)
        lifted = relative >= 0.0016
        predicted = torch.sort(torch.linalg.svdvals(spectral_ns(g)).float(), descending=True).values
        torch.testing.assert_close(s, predicted, rtol=0, atol=1e-4)
        in_band = ((s >= 0.68) & (s <= 1.203)).sum()
        assert in_band == lifted.sum(), (shape, s)
        # rectangular Gaussians: all lifted; a square one's two smallest s/‖G‖_F are below 0.0016
        assert lifted.sum() == min(shape) - (2 if shape[0] == shape[1] else 0)


# ------------------------------------------------------------------------------------ full step

SHAPES = {"hidden": (6, 4), "conv": (3, 2, 2, 2), "tall": (7, 3), "embedding": (5, 4), "bias": (4,)}
MUON = ("hidden", "conv", "tall")


def make_groups(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen, dtype=DT).requires_grad_() for k, s in SHAPES.items()}
    groups = [{"params": [params[k] for k in MUON], "use_muon": True},
              {"params": [params["embedding"]], "use_muon": False},
              {"params": [params["bias"]], "use_muon": False, "weight_decay": 0.0}]
    return params, groups


def reference_muon(params, lrs, mu, nesterov, wd, betas, eps):
    """The module docstring's update, step by step in float64; lrs[k] is the LR of step k."""
    b1, b2 = betas
    ws = {k: p.detach().clone() for k, p in params.items()}
    state = {k: torch.zeros_like(w) for k, w in ws.items()}
    sq = {k: torch.zeros_like(w) for k, w in ws.items()}
    for k, lr in enumerate(lrs):
        grads = dict(zip(ws, PROBLEM.grads_at(list(ws.values()), k)))
        for name, w in ws.items():
            g = grads[name]
            if name in MUON:
                state[name] = mu * state[name] + g
                u = g + mu * state[name] if nesterov else state[name]
                rows, cols = w.shape[0], w[0].numel()
                o = spectral_ns(u.reshape(rows, cols)).reshape(w.shape)
                ws[name] = w * (1 - lr * wd) - lr * 0.2 * max(rows, cols) ** 0.5 * o
            else:
                decay = 0.0 if name == "bias" else wd
                state[name] = b1 * state[name] + (1 - b1) * g
                sq[name] = b2 * sq[name] + (1 - b2) * g * g
                m_hat, v_hat = state[name] / (1 - b1 ** (k + 1)), sq[name] / (1 - b2 ** (k + 1))
                ws[name] = w * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return ws


def run(opt: Muon, params: dict, lrs: list[float]) -> None:
    tensors = list(params.values())
    for k, lr in enumerate(lrs):
        for group in opt.param_groups:  # what the trainer's set_lr does: one LR for every group
            group["lr"] = lr
        for p, g in zip(tensors, PROBLEM.grads_at(tensors, k)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_ten_steps_match_the_float64_reference(nesterov):
    lrs = [0.02 * (1 + k % 3) for k in range(10)]  # a changing LR reaches both parts
    params, groups = make_groups()
    expected = reference_muon(params, lrs, 0.9, nesterov, 0.1, (0.9, 0.95), 1e-8)
    opt = Muon(groups, momentum=0.9, nesterov=nesterov, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    run(opt, params, lrs)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-11, msg=name)
        assert (p.detach() - make_groups()[0][name].detach()).abs().max() > 1e-2  # it really moved


def test_zero_gradient_matrix_only_decays_and_no_momentum_is_plain_orthogonalized_gradient():
    w0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    w = w0.clone().requires_grad_()
    w.grad = torch.zeros_like(w)
    Muon([w], lr=0.1, weight_decay=0.5).step()
    torch.testing.assert_close(w.detach(), w0 * (1 - 0.1 * 0.5), rtol=1e-15, atol=0)  # NS(0) = 0
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    for nesterov in (True, False):  # μ = 0: u = g either way
        w = w0.clone().requires_grad_()
        w.grad = g
        Muon([w], lr=0.1, momentum=0.0, nesterov=nesterov).step()
        torch.testing.assert_close(w.detach(), w0 - 0.1 * 0.2 * 5 ** 0.5 * spectral_ns(g), rtol=0, atol=1e-12)


def test_adamw_part_is_torch_adamw():
    params, _ = make_groups(3)
    ours = [params["embedding"], params["bias"]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = Muon([{"params": ours, "use_muon": False}], lr=0.01, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    for k in range(8):
        for mine, other, g in zip(ours, theirs, PROBLEM.grads_at(ours, k)):
            mine.grad, other.grad = g, g.clone()
        opt.step()
        ref.step()
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine.detach(), other.detach(), rtol=1e-13, atol=1e-15)


def test_update_rms_matches_adamw_scale():
    # 0.2·√max(rows, cols) · NS(u) has RMS ≈ 0.2·√(Σ p⁵(s)² / min(r, c)) with every p⁵(s) in the band
    w = torch.zeros(64, 16, requires_grad=True)
    w.grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    Muon([w], lr=1.0, momentum=0.0).step()
    rms = w.detach().pow(2).mean().sqrt().item()
    assert 0.2 * 0.68 <= rms <= 0.2 * 1.203


def steps(opt: Muon, params: dict, ks: range) -> None:
    tensors = list(params.values())
    for k in ks:
        for p, g in zip(tensors, PROBLEM.grads_at(tensors, k)):
            p.grad = g
        opt.step()


def test_state_dict_round_trip_continues_identically():
    params, groups = make_groups(1)
    opt = Muon(groups, lr=0.01, momentum=0.9, weight_decay=0.1)
    steps(opt, params, range(3))
    saved, weights = copy.deepcopy(opt.state_dict()), {k: p.detach().clone() for k, p in params.items()}
    steps(opt, params, range(3, 7))
    resumed, groups2 = make_groups(1)
    with torch.no_grad():
        for k, p in resumed.items():
            p.copy_(weights[k])
    opt2 = Muon(groups2, lr=0.5)  # every setting comes back from the state dict
    opt2.load_state_dict(saved)
    steps(opt2, resumed, range(3, 7))
    for k in params:
        assert torch.equal(params[k], resumed[k])


# ------------------------------------------------------------------------------ parameter roles

def roles(model) -> dict[str, tuple[bool, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["use_muon"], g["weight_decay"]) for g in muon_param_groups(model, 0.1, False)
            for p in g["params"]}


def test_gpt_roles_embeddings_and_tied_head_go_to_adamw():
    r = roles(GPT(11, 8, n_layer=2, n_head=2, d_model=16))
    assert r["tok.weight"] == r["pos.weight"] == (False, 0.1)  # head.weight is tok.weight (tied)
    assert r["blocks.0.attn.qkv.weight"] == r["blocks.1.mlp.2.weight"] == (True, 0.1)
    assert r["blocks.0.ln1.weight"] == r["blocks.0.attn.qkv.bias"] == r["ln_f.bias"] == (False, 0.0)
    assert sum(m for m, _ in r.values()) == 2 * 4  # qkv, proj, fc1, fc2 per block


def test_mlp_and_resnet_roles_head_goes_to_adamw():
    r = roles(MLP((8,), 3, [16, 16]))
    assert r["head.weight"] == (False, 0.1) and r["head.bias"] == (False, 0.0)
    assert r["blocks.0.linear.weight"] == r["blocks.1.linear.weight"] == (True, 0.1)
    r = roles(ResNet((3, 8, 8), 5, width=4, blocks=[1, 1]))
    assert r["head.weight"] == (False, 0.1) and r["stem.0.weight"] == (True, 0.1)  # conv: out × in·k·k
    vectors = muon_param_groups(MLP((8,), 3, [16]), 0.1, decay_norm_and_bias=True)[-1]
    assert (len(vectors["params"]), vectors["weight_decay"]) == (2, 0.1)  # both biases, decayed


def test_factory_builds_muon_from_the_config(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(
        tmp_path, optim={"name": "muon", "lr": 0.02, "momentum": 0.95, "nesterov": True, "muon_ns_steps": 3})))
    opt = build_optimizer(MLP((8,), 3, [16, 16]), cfg.optim)
    assert isinstance(opt, Muon)
    assert [(g["use_muon"], len(g["params"]), g["ns_steps"], g["momentum"]) for g in opt.param_groups] == \
        [(True, 2, 3, 0.95), (False, 1, 3, 0.95), (False, 3, 3, 0.95)]


# ------------------------------------------------------------------------------- planner, rules

def test_planner_counts_momentum_for_hidden_matrices_and_adam_moments_elsewhere():
    model = GPT(11, 8, n_layer=2, n_head=2, d_model=16)
    spec = GPTSpec(n_layer=2, d_model=16, n_head=2, vocab_size=11, seq_len=8)
    n, hidden = spec.n_params, 2 * 12 * 16 * 16
    assert (n, hidden) == (sum(p.numel() for p in model.parameters()), hidden_matrix_params(model))
    assert model_optimizer_bytes(spec, "muon") == 4 * hidden + 8 * (n - hidden)
    assert model_optimizer_bytes(spec, "adamw") == 8 * n
    mlp = MLP((8,), 3, [16, 16])  # hidden: 16·8 + 16·16; AdamW: head 3·16 + biases 16 + 16 + 3
    measured = MeasuredSpec(mlp, torch.randn(2, 8))
    assert model_optimizer_bytes(measured, "muon") == 4 * (128 + 256) + 8 * (48 + 35)
    report = plan(spec, 2, 10**9, optimizer="muon")
    assert report.states[0].optimizer == model_optimizer_bytes(spec, "muon")  # ddp: whole state
    assert report.states[1].optimizer == -(-model_optimizer_bytes(spec, "muon") // 2)  # zero1: a half
    assert "muon (4 B/param in hidden matrices, 8 B/param elsewhere)" in format_plan(report)


def problems(tmp_path, **sections) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections)))
    return info.value.problems


def test_deepspeed_refuses_muon_naming_the_key(tmp_path):
    for stage in (0, 2):
        [problem] = problems(tmp_path, optim={"name": "muon"}, distributed={"strategy": "deepspeed"},
                             deepspeed={"stage": stage})
        assert problem.startswith("optim.name: muon orthogonalizes each whole weight matrix")
        assert "set distributed.strategy to ddp, zero1, zero2 or zero3" in problem


def test_bad_muon_values_exit_2_with_one_line(tmp_path, capsys):
    cases = [({"optim": {"name": "muon", "muon_ns_steps": 0}}, "optim.muon_ns_steps"),
             ({"optim": {"name": "muon"}, "distributed": {"strategy": "deepspeed"}}, "optim.name: muon"),
             ({"optim": {"name": "muon", "impl": "apex"}}, "optim.impl: apex provides only")]
    for i, (sections, key) in enumerate(cases):
        config = write_config(tmp_path / f"c{i}.yaml", tiny_config(tmp_path, **sections))
        assert main(["train", str(config)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if key in line]
        assert len(lines) == 1, (key, lines)
    assert not (tmp_path / "runs").exists()


def test_muon_validates_on_every_supported_strategy(tmp_path):
    for strategy in ("ddp", "zero1", "zero2", "zero3", "diloco"):
        raw = tiny_config(tmp_path, optim={"name": "muon"}, distributed={"strategy": strategy})
        load_config(write_config(tmp_path / "c.yaml", raw), world_size=2)


def test_band_constants_are_the_quintics():
    s = np.linspace(1e-3, 1.0, 20001)
    for _ in range(5):
        s = A * s + B * s ** 3 + C * s ** 5
    top = s.max()
    assert 1.2023 < top < 1.2025  # the 1.203 bound used above
