"""Datasets: IDX decoding, text and token windows, synthetic determinism, custom builders."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from bigbatch.config import DataConfig
from bigbatch.data.fashion_mnist import load_fashion_mnist, read_idx
from bigbatch.data.registry import build_data
from bigbatch.data.text import load_text, load_tokens
from tests.conftest import needs_fashion_mnist


def write_idx(path, magic, array):
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes())


def test_idx_decoding_round_trips(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", 2051, images)
    assert np.array_equal(read_idx(tmp_path / "x.gz", 2051), images)
    with pytest.raises(ValueError, match="not an IDX file of the expected kind"):
        read_idx(tmp_path / "x.gz", 2049)


@needs_fashion_mnist
def test_real_fashion_mnist_shapes_and_normalisation():
    data = load_fashion_mnist("/usr/share/datasets/fashion-mnist")
    assert (len(data.train), len(data.val)) == (60000, 10000)
    x, y = data.train.batch(torch.arange(5000))
    assert x.shape == (5000, 1, 28, 28) and set(y.unique().tolist()) <= set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05  # (x - 0.286) / 0.353


def test_text_vocabulary_and_split(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 10)   # 100 characters, 10 distinct
    (tmp_path / "skip.md").write_text("zzzz")            # does not match the glob
    data = load_text(tmp_path, "*.txt", seq_len=4, val_fraction=0.2)
    assert data.num_classes == 10
    assert len(data.train) == (80 - 1) // 4 and len(data.val) == (20 - 1) // 4
    x, y = data.train.batch(torch.tensor([1]))
    assert x.tolist() == [[4, 5, 6, 7]] and y.tolist() == [[5, 6, 7, 8]]  # "efgh" -> "fghi"


def test_token_file_memmap_windows(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 300
    ids.tofile(tmp_path / "tokens.bin")
    data = load_tokens(tmp_path / "tokens.bin", "uint16", seq_len=8, val_fraction=0.1, vocab_size=None)
    assert data.num_classes == 300 and len(data.train) == (900 - 1) // 8
    x, y = data.train.batch(torch.tensor([2, 0]))
    assert x[0].tolist() == list(range(16, 24)) and y[1].tolist() == list(range(1, 9))


def test_synthetic_is_deterministic_and_learnable_shape():
    cfg = DataConfig(name="synthetic", shape=[3, 4], num_classes=5, num_samples=100, val_fraction=0.2)
    a, b = build_data(cfg, seed=1), build_data(cfg, seed=1)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.train.targets, b.train.targets)
    assert (len(a.train), len(a.val), a.input_shape) == (80, 20, (3, 4))


def test_custom_builder_must_return_a_databundle():
    cfg = DataConfig(name="tests.unit.test_data:not_a_bundle")
    with pytest.raises(ValueError, match="must return bigbatch.data.base.DataBundle"):
        build_data(cfg, seed=0)


def not_a_bundle(cfg):
    return [1, 2, 3]
