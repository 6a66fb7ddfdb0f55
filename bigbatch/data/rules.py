"""Torch-free checks of the `data` section, run by bigbatch.validate before anything starts."""

from __future__ import annotations

import math
from pathlib import Path

from bigbatch.config import DataConfig
from bigbatch.plugins import plugin_problems

BUILTIN_DATA = ("fashion_mnist", "text", "tokens", "synthetic")
DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MAX_SYNTHETIC_VALUES = 2**30  # 4 GiB of float32, drawn at once on every rank


def data_problems(data: DataConfig) -> list[str]:
    if data.name not in BUILTIN_DATA:
        return plugin_problems("data.name", data.name, BUILTIN_DATA)
    if data.name == "fashion_mnist":
        folder = Path(data.path or DEFAULT_FASHION_MNIST)
        if not (folder / "train-images-idx3-ubyte.gz").is_file():
            return [f"data.path: no Fashion-MNIST IDX files in {folder}; install them with "
                    "`apt-get install dataset-fashion-mnist` (Debian) or set data.path to a folder "
                    "holding train-images-idx3-ubyte.gz and friends"]
    if data.name == "synthetic":
        return synthetic_problems(data)
    if data.name in ("text", "tokens"):
        if data.path is None:
            return [f"data.path: required for data.name={data.name}"]
        if data.name == "tokens" and not Path(data.path).is_file():
            return [f"data.path: token file {data.path} not found"]
        if data.name == "text" and not Path(data.path).exists():
            return [f"data.path: {data.path} not found; point it at a text file or a folder"]
    return []


def synthetic_problems(data: DataConfig) -> list[str]:
    """Synthetic inputs and the teacher are drawn whole on every rank; refuse what cannot fit."""
    values = (data.num_samples + data.num_classes) * math.prod(data.shape)
    if values <= MAX_SYNTHETIC_VALUES:
        return []
    return [f"data.num_samples: {data.num_samples} synthetic samples of shape {data.shape} (and the teacher "
            f"for {data.num_classes} classes) are {values} values, more than {MAX_SYNTHETIC_VALUES} (4 GiB); "
            "use fewer samples or a smaller data.shape"]
