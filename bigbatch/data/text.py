"""Language-model data: character-level text files, or a flat binary file of token ids.

Both are cut into non-overlapping windows of seq_len + 1 tokens; window i gives inputs
tokens[i·T : i·T+T] and targets shifted by one. The last `val_fraction` of the stream is held out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bigbatch.data.base import DataBundle


class WindowSplit:
    """Non-overlapping next-token windows over a 1-D token array (in memory or memory-mapped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = indices.numpy().astype(np.int64)[:, None] * self.seq_len
        window = np.asarray(self.tokens[starts + np.arange(self.seq_len + 1)]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]


def _bundle(tokens: np.ndarray, seq_len: int, val_fraction: float, vocab: int, key: str) -> DataBundle:
    cut = int(len(tokens) * (1 - val_fraction))
    train, val = WindowSplit(tokens[:cut], seq_len), WindowSplit(tokens[cut:], seq_len)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{key}: {len(tokens)} tokens give no full window of data.seq_len={seq_len} "
                         f"in one split (val_fraction={val_fraction}); use more data or a shorter seq_len")
    return DataBundle(train, val, "lm", (seq_len,), vocab)


def text_files(path: str | Path, pattern: str) -> list[Path]:
    path = Path(path)
    return [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())


def load_text(path: str | Path, pattern: str, seq_len: int, val_fraction: float) -> DataBundle:
    """Character-level corpus: the vocabulary is the sorted set of characters in all files."""
    files = text_files(path, pattern)
    if not files:
        raise ValueError(f"data.path: no files matching data.glob={pattern!r} under {path}")
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    tokens = np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text))
    return _bundle(tokens, seq_len, val_fraction, len(vocab), "data.path")


def load_tokens(path: str | Path, dtype: str, seq_len: int, val_fraction: float,
                vocab_size: int | None) -> DataBundle:
    """A nanoGPT-style flat binary of uint16/uint32 ids, read lazily through np.memmap."""
    tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    vocab = vocab_size or int(tokens.max()) + 1
    return _bundle(tokens, seq_len, val_fraction, vocab, "data.path")
