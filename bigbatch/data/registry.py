"""`data.name` → a DataBundle: the built-in datasets or a user's `package.module:build`."""

from __future__ import annotations

from bigbatch.config import DataConfig
from bigbatch.data.rules import DEFAULT_FASHION_MNIST
from bigbatch.plugins import PluginError, load_plugin
from bigbatch.data.base import DataBundle
from bigbatch.data.fashion_mnist import load_fashion_mnist
from bigbatch.data.synthetic import load_synthetic
from bigbatch.data.text import load_text, load_tokens


def build_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Load the configured dataset. A custom builder is called as `build(cfg)` and returns a DataBundle."""
    if cfg.name == "fashion_mnist":
        return load_fashion_mnist(cfg.path or DEFAULT_FASHION_MNIST)
    if cfg.name == "text":
        return load_text(cfg.path, cfg.glob, cfg.seq_len, cfg.val_fraction, cfg.errors)
    if cfg.name == "tokens":
        return load_tokens(cfg.path, cfg.token_dtype, cfg.seq_len, cfg.val_fraction, cfg.vocab_size)
    if cfg.name == "synthetic":
        return load_synthetic(cfg.shape, cfg.num_classes, cfg.num_samples, cfg.val_fraction, seed)
    build = load_plugin("data.name", cfg.name)
    if not callable(build):
        raise PluginError(f"data.name: '{cfg.name}' is a {type(build).__name__}, not a function; name the "
                          "builder that returns a DataBundle")
    bundle = build(cfg)
    if not isinstance(bundle, DataBundle):
        raise ValueError(f"data.name: {cfg.name} returned {type(bundle).__name__}; a custom builder "
                         "must return bigbatch.data.base.DataBundle")
    return bundle
