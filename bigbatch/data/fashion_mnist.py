"""Fashion-MNIST read straight from its IDX .gz files (Debian: dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from bigbatch.data.base import DataBundle, DataError, TensorSplit

# Mean and std of the training images, for the usual per-channel normalisation.
MEAN, STD = 0.2860, 0.3530
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one IDX file: big-endian header (magic, dims...), then uint8 data."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"data.path: {path} is not a readable gzip file ({err}); download it again") from None
    ndim = magic & 0xFF
    header = np.frombuffer(raw, dtype=">i4", count=1)[0] if len(raw) >= 4 else None
    if header != magic:
        raise DataError(f"data.path: {path} is not an IDX file of the expected kind "
                        f"(magic {header}, expected {magic})")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4) if len(raw) >= 4 + 4 * ndim else None
    body, expected = len(raw) - 4 - 4 * ndim, None if dims is None else int(np.prod(dims, dtype=np.int64))
    if body != expected:
        raise DataError(f"data.path: {path} is truncated or padded ({max(body, 0)} data bytes, {expected} "
                        f"expected for dimensions {None if dims is None else dims.tolist()}); download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _split(folder: Path, prefix: str) -> TensorSplit:
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", IMAGE_MAGIC)
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", LABEL_MAGIC)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return TensorSplit((x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(folder: str | Path) -> DataBundle:
    """60k training and 10k test images, 1×28×28, normalised; 10 classes."""
    folder = Path(folder)
    return DataBundle(_split(folder, "train"), _split(folder, "t10k"), "classify", (1, 28, 28), 10)
