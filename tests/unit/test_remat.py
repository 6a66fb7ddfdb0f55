"""Remat changes memory, never results: gradients, buffers and state-dict keys equal those without it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.memory.activation import measure_saved_bytes
from bigbatch.models.gpt import GPT
from bigbatch.models.mlp import MLP
from bigbatch.models.resnet import ResNet
from bigbatch.memory.remat import POLICIES, apply_remat, wrapped_indices


def _gpt():  # dropout on: recomputation must replay the same masks
    return GPT(vocab_size=17, block_size=8, n_layer=3, n_head=2, d_model=16, dropout=0.1), \
        torch.randint(0, 17, (2, 8)), torch.randint(0, 17, (2 * 8,))


def _resnet():  # BatchNorm: running statistics must move once per forward
    return ResNet((3, 8, 8), num_classes=5, width=4, blocks=[1, 1, 1]), torch.randn(3, 3, 8, 8), \
        torch.randint(0, 5, (3,))


def _mlp():
    return MLP((6,), num_classes=3, hidden=[8, 8, 8], dropout=0.2), torch.randn(4, 6), \
        torch.randint(0, 3, (4,))


MODELS = {"gpt": _gpt, "resnet": _resnet, "mlp": _mlp}


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
    torch.manual_seed(1)  # same dropout masks for every policy
    out = model(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y).backward()
    return [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", ["full", "every_k", "selective"])
def test_gradients_and_buffers_equal_those_without_remat(name, policy):
    torch.manual_seed(0)
    base, x, y = MODELS[name]()
    ref_grads, ref_buffers = _step(copy.deepcopy(base), x, y)
    grads, buffers = _step(apply_remat(copy.deepcopy(base), policy, k=2), x, y)
    for ref, got in zip(ref_grads + ref_buffers, grads + buffers):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_unchanged_and_checkpoints_interchangeable(name):
    plain = MODELS[name]()[0]
    for policy in POLICIES:
        remat = apply_remat(copy.deepcopy(plain), policy)
        assert list(remat.state_dict()) == list(plain.state_dict())
        remat.load_state_dict(plain.state_dict())  # strict: same keys, both ways
        plain.load_state_dict(remat.state_dict())


def test_saved_bytes_strictly_decrease_none_selective_full():
    torch.manual_seed(0)
    model = GPT(vocab_size=65, block_size=32, n_layer=4, n_head=4, d_model=32)
    idx = torch.randint(0, 65, (2, 32))
    saved = {p: measure_saved_bytes(apply_remat(copy.deepcopy(model), p), idx) for p in POLICIES}
    assert saved["none"] > saved["selective"] > saved["full"]
    assert saved["none"] > saved["every_k"] > saved["full"]


def test_every_k_wraps_blocks_0_k_2k():
    assert wrapped_indices(5, "every_k", 2) == [0, 2, 4]
    assert wrapped_indices(5, "every_k", 3) == [0, 3]
    assert wrapped_indices(5, "full") == wrapped_indices(5, "selective") == [0, 1, 2, 3, 4]
    assert wrapped_indices(5, "none") == []


def test_apply_again_replaces_and_none_removes_the_wrapping():
    model = _mlp()[0]
    apply_remat(model, "full")
    assert all("forward" in vars(block) for block in model.blocks)
    apply_remat(model, "every_k", k=2)
    assert ["forward" in vars(block) for block in model.blocks] == [True, False, True]
    apply_remat(model, "none")
    assert not any("forward" in vars(block) for block in model.blocks)


def test_deepcopy_rebinds_the_wrapped_forward_to_the_copy():
    model, x, y = _mlp()
    twin = copy.deepcopy(apply_remat(model, "full"))
    _step(twin, x, y)
    assert all(p.grad is not None for p in twin.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_no_grad_forward_matches():
    model, x, _ = _gpt()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(apply_remat(model, "selective")(x), expected)


def test_bad_settings_name_the_config_key():
    with pytest.raises(ValueError, match="remat.policy"):
        apply_remat(_mlp()[0], "sometimes")
    with pytest.raises(ValueError, match="remat.k"):
        apply_remat(_mlp()[0], "every_k", k=0)
    no_blocks = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="remat.policy.*blocks"):
        apply_remat(no_blocks, "full")
    assert apply_remat(no_blocks, "none") is no_blocks
