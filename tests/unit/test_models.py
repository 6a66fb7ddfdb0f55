"""Models: sizes, causality, tied embeddings, custom import path."""

from __future__ import annotations

import torch

from bigbatch.config import ModelConfig
from bigbatch.data.base import DataBundle
from bigbatch.models.gpt import GPT
from bigbatch.models.registry import build_model
from bigbatch.models.resnet import ResNet


def test_resnet18_layout_has_about_11m_parameters():
    model = ResNet((3, 32, 32), 10, width=64, blocks=[2, 2, 2, 2])
    count = sum(p.numel() for p in model.parameters())
    assert 11.1e6 < count < 11.25e6  # ResNet-18 (CIFAR stem): 11.17M
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_gpt_is_causal_and_ties_embeddings():
    torch.manual_seed(0)
    model = GPT(vocab_size=17, block_size=8, n_layer=2, n_head=2, d_model=16).eval()
    assert model.head.weight is model.tok.weight
    idx = torch.randint(0, 17, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 17  # alter only the future of position 4
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (1, 8, 17)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions 0..4 cannot see positions 5..7
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_mlp_blocks_and_custom_model_by_import_path():
    data = DataBundle(None, None, "classify", (1, 4, 4), 3)
    mlp = build_model(ModelConfig(name="mlp", hidden=[8, 6]), data)
    assert len(mlp.blocks) == 2 and mlp(torch.randn(5, 1, 4, 4)).shape == (5, 3)
    custom = build_model(ModelConfig(name="torch.nn:Linear", kwargs={"in_features": 4, "out_features": 2}), data)
    assert isinstance(custom, torch.nn.Linear) and custom.out_features == 2
